"""`transferkit serve` with a multi-label run: label sets decided by per-label thresholds, on both engines and on
the page (the single-label server and its shared helpers are in test_serve)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.test_multilabel import BLUE, RED, multilabel_csv, patches
from tests.test_serve import CHROMIUM, CHROMIUM_ARGS, serving, upload
from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.predictor import load_predictor
from transferkit.runs.run import Run
from transferkit.serve import create_app


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str) -> tuple[Run, list[Path]]:
    """test_multilabel's red/blue-patch run (its options: labels that separate clearly) and two new images: both
    patches, and red alone."""
    root = tmp_path_factory.mktemp("serve-multilabel")
    run = api.train(multilabel_csv(root / "data"), root / "run", backbone="test_efficientnet", weights=tiny_weights,
                    image_size=32, batch_size=8, workers=0, epochs_frozen=40, epochs_finetune=1, augment="none",
                    quiet=True, lr=0.3, head_dropout=0.0, patience=0)
    rng = np.random.default_rng(7)
    return run, [patches(root / "both.png", (RED, BLUE), rng), patches(root / "red.png", (RED,), rng)]


def test_multilabel_run_exports_to_int8_and_both_engines_serve_label_sets_like_predict(multilabel_run, capsys) -> None:
    run, pictures = multilabel_run
    # The int8 export of a multi-label run passes its check: per (image, label) decision agreement with PyTorch.
    assert run_cli(["export", str(run.path), "--format", "onnx", "--int8"]) == 0
    assert "label agreement with PyTorch 100.0%" in capsys.readouterr().err
    for engine in ("torch", "int8"):
        assert run_cli(["predict", str(run.path), *map(str, pictures), "--engine", engine, "--json"]) == 0
        expected = json.loads(capsys.readouterr().out)
        predictor = load_predictor(run.path, engine)
        with serving(create_app(predictor, run_dir=run.path)) as url:
            info = httpx.get(f"{url}/model").json()
            response = httpx.post(f"{url}/predict", params={"top_k": 1}, files=upload(*pictures))
        assert info["thresholds"] == pytest.approx(run.meta["thresholds"]) and info["task"] == "multilabel"
        assert response.status_code == 200, response.text
        served = response.json()["predictions"]
        assert [set(p) for p in served] == [{"filename", "labels", "probabilities"}] * 2
        assert [p["filename"] for p in served] == [p.name for p in pictures]
        assert [p["labels"] for p in served] == [e["labels"] for e in expected] == [["blue", "red"], ["red"]], engine
        for got, want in zip(served, expected, strict=True):
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)


@pytest.mark.browser
def test_page_shows_a_multilabel_runs_label_sets_with_thresholds(multilabel_run) -> None:
    from playwright.sync_api import expect, sync_playwright

    run, pictures = multilabel_run
    problems: list[str] = []
    with serving(create_app(run)) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(url)
            expect(page.locator("#model-info")).to_contain_text("2 labels, each decided by its own threshold")
            page.set_input_files("#files", str(pictures[0]))
            card = page.locator(".card").first
            expect(card.locator(".prediction .label")).to_have_text(["blue", "red"])
            expect(card.locator(".bar .threshold")).to_have_count(2)
            expect(card.locator(".bar-row.on")).to_have_count(2)
            page.set_input_files("#files", str(pictures[1]))
            expect(page.locator(".card").first.locator(".prediction .label")).to_have_text(["red"])
            expect(page.locator(".card").first.locator(".bar-row.on .bar-label")).to_have_text(["red"])
            expect(page.locator(".card").first.locator("img.gradcam")).to_have_count(1)
            assert not problems, problems
        finally:
            browser.close()
