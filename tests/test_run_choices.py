"""What training chooses on validation (temperature, threshold, test-time views) is recorded in meta.json and
reproduced by evaluate, predict, serve and the ONNX export.

One binary run is trained per module; copies of it get chosen values written into their meta.json, so each
consumer is checked against numbers computed here independently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_class_folders
from tests.test_cli import fails_with
from tests.test_serve import serving, upload
from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.export.onnx import export_run
from transferkit.predictor import OnnxPredictor
from transferkit.report import write_report
from transferkit.runs.run import Run
from transferkit.serve.app import create_app

TEMPERATURE = 2.5


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_weights) -> Path:
    root = tmp_path_factory.mktemp("choices")
    data = make_class_folders(root / "data", classes=2, per_class=16)
    api.train(data, root / "run", backbone="test_efficientnet", weights=tiny_weights, image_size=32, batch_size=8,
              workers=0, epochs_frozen=3, head_fit="sgd", epochs_finetune=0, augment="none", quiet=True, tta="flip",
              operating_point="balanced")
    return root


def image_paths(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "data").rglob("*.png"))


def with_meta(source: Path, folder: Path, **changes) -> Path:
    """A copy of the run folder `source` with `changes` in its meta.json."""
    shutil.copytree(source, folder)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **changes}))
    return folder


@pytest.fixture(scope="module")
def chosen(trained, tmp_path_factory) -> tuple[Path, float, list[str]]:
    """A copy of the run with temperature 2.5, the 8 dihedral views and a threshold at the median probability, so
    that some images get the less probable class; exported to ONNX. Returns the folder, threshold and labels."""
    folder = with_meta(trained / "run", tmp_path_factory.mktemp("chosen") / "run", temperature=TEMPERATURE,
                       tta="dihedral", threshold=None)
    positive = Run(folder).probabilities(image_paths(trained))[:, 1]
    threshold = float(np.sort(positive)[len(positive) // 2])
    expected = [["class_0", "class_1"][int(p >= threshold)] for p in positive]
    assert expected != [["class_0", "class_1"][int(p > 0.5)] for p in positive], "the cut must change a label"
    with_meta(folder, folder.with_name("final"), threshold=threshold, operating_point="recall=0.9")
    export_run(folder.with_name("final"))
    return folder.with_name("final"), threshold, expected


def test_training_records_its_choices_in_meta_and_metrics(trained):
    meta = json.loads((trained / "run" / "meta.json").read_text())
    metrics = json.loads((trained / "run" / "metrics.json").read_text())
    assert meta["tta"] == metrics["tta"] == "flip" and metrics["tta_views"] == 2
    assert meta["operating_point"] == metrics["operating_point"] == "balanced"
    assert meta["temperature"] == metrics["temperature"] > 0
    assert metrics["threshold"] == meta["threshold"]
    recalls = [m["recall"] for m in metrics["per_class"].values()]
    assert metrics["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["ece_uncalibrated"] <= 1
    assert metrics["seconds_per_image"] > 0


def test_run_probabilities_are_dihedral_averaged_logits_over_the_temperature(chosen, trained):
    run = Run(chosen[0])
    paths = image_paths(trained)
    pixels = torch.stack([run.transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        views = [torch.rot90(x, k, dims=(2, 3)) for x in (pixels, pixels.flip(3)) for k in range(4)]
        logits = torch.stack([run.model.eval()(view) for view in views]).mean(dim=0)
    expected = torch.sigmoid(logits[:, 0] / TEMPERATURE).numpy()
    assert run.probabilities(paths)[:, 1] == pytest.approx(expected, abs=1e-5)


def test_onnx_export_holds_the_views_and_temperature_and_carries_the_threshold(chosen, trained):
    folder, threshold, _ = chosen
    predictor = OnnxPredictor(folder / "model.onnx")
    assert predictor.threshold == threshold
    assert json.loads(predictor.metadata["temperature"]) == TEMPERATURE and predictor.metadata["tta"] == "dihedral"
    paths = image_paths(trained)
    assert predictor.probabilities(paths) == pytest.approx(Run(folder).probabilities(paths), abs=1e-4)


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_predict_applies_the_threshold(chosen, trained, capsys, engine):
    folder, _, expected = chosen
    assert run_cli(["predict", str(folder), *image_paths(trained), "--engine", engine, "--json"]) == 0
    assert [r["label"] for r in json.loads(capsys.readouterr().out)] == expected


def test_evaluate_decides_by_the_threshold(chosen, trained):
    folder, threshold, _ = chosen
    run = Run(folder)
    metrics = run.evaluate(trained / "data", split="all", write=False)
    positive = run.probabilities(image_paths(trained))[:, 1]
    truth = np.array([int("class_1" in p) for p in image_paths(trained)])
    assert metrics["accuracy"] == pytest.approx(((positive >= threshold) == truth).mean())
    assert metrics["threshold"] == threshold and metrics["operating_point"] == "recall=0.9"


@pytest.mark.parametrize("load", [Run, lambda folder: OnnxPredictor(folder / "model.onnx")])
def test_serve_applies_the_threshold(chosen, trained, load):
    folder, threshold, expected = chosen
    paths = image_paths(trained)
    with serving(create_app(load(folder), run_dir=folder)) as base:
        served = httpx.post(f"{base}/predict", files=upload(*map(Path, paths[:4]))).json()["predictions"]
        info = httpx.get(f"{base}/model").json()
    assert [p["label"] for p in served] == expected[:4]
    assert info["threshold"] == threshold and info["temperature"] == TEMPERATURE and info["tta"] == "dihedral"


def test_console_summary_gives_balanced_accuracy_and_recall_per_class(trained, tmp_path, capsys):
    folder = with_meta(trained / "run", tmp_path / "run")
    assert run_cli(["evaluate", str(folder), str(trained / "data")]) == 0
    metrics = json.loads((folder / "metrics.json").read_text())
    err = capsys.readouterr().err
    assert f"balanced {metrics['balanced_accuracy']:.4f}" in err and f"ECE {metrics['ece']:.4f}" in err
    recall = metrics["per_class"]["class_1"]["recall"]
    assert "recall per class: class_0 " in err and f"class_1 {recall:.3f}" in err


def test_report_shows_reliability_and_the_operating_point(chosen, trained, tmp_path):
    folder = with_meta(chosen[0], tmp_path / "run")
    run = Run(folder)
    metrics = run.evaluate(trained / "data", split="all")
    page = write_report(run).read_text()
    assert 'alt="reliability diagram"' in page and 'alt="precision-recall curve"' in page
    assert f"temperature {TEMPERATURE:.3f}" in page and f"before scaling {metrics['ece_uncalibrated']:.4f}" in page
    assert f"positive at p &ge; {chosen[1]:.4f}" in page


def test_a_meta_json_with_an_unknown_tta_is_one_line_and_exit_2(trained, tmp_path, capsys):
    folder = with_meta(trained / "run", tmp_path / "run", tta="sideways")
    fails_with(capsys, ["predict", str(folder), image_paths(trained)[0], "--engine", "torch"], "unknown tta 'sideways'")
