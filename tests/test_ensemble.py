"""Ensemble run folders (decision 0275): built from two tiny runs, then through `predict`, `evaluate`, `explain`,
`export` (one ONNX per member, averaged by the predictor without PyTorch), `serve` and the report; commands that
need one model refuse with one line. The race keeps both finalists when the average beats the winner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import transferkit.cli.export  # noqa: F401  (registers `export`)
from tests.conftest import make_class_folders
from tests.test_auto import run_and_capture
from tests.test_cli import fails_with
from transferkit import api
from transferkit.auto import race
from transferkit.config import resolve_config
from transferkit.data.sources import scan_dataset
from transferkit.predictor import EnsemblePredictor, load_predictor
from transferkit.progress import Reporter
from transferkit.runs.ensemble import Ensemble, ensemble_gain, write_ensemble
from transferkit.runs.run import Run, open_run
from transferkit.serve import create_app


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str) -> Path:
    """RUN/members/{a,b}: two tiny runs on the same split (different head seeds), kept together."""
    root = tmp_path_factory.mktemp("ensemble")
    data = make_class_folders(root / "data", classes=3, per_class=12)
    out = root / "run"
    options = dict(backbone="test_efficientnet", weights=tiny_weights, image_size=32, batch_size=8, workers=0,
                   epochs_frozen=4, epochs_finetune=1, augment="none", lr=0.03, quiet=True)
    members = [api.train(data, out / "members" / name, head_dropout=dropout, **options)
               for name, dropout in (("a", 0.2), ("b", 0.0))]
    index = scan_dataset(data, 0.2, 0.0, 0)
    gain = ensemble_gain(members, ["a", "b"], index, "val_loss")
    write_ensemble(out, members, ["a", "b"], gain)
    return out


def images_of(ensemble: Path) -> list[str]:
    return sorted(str(p) for p in (ensemble.parent / "data").rglob("*.png"))[:5]


def test_an_ensemble_averages_its_members_probabilities(ensemble: Path) -> None:
    loaded = open_run(ensemble)
    assert isinstance(loaded, Ensemble) and isinstance(api.load(ensemble), Ensemble)
    paths = images_of(ensemble)
    expected = np.mean([Run(ensemble / "members" / n).probabilities(paths) for n in "ab"], axis=0)
    np.testing.assert_allclose(loaded.probabilities(paths), expected, atol=1e-6)
    # evaluation goes through the logits of the averaged probabilities: the same numbers come back
    np.testing.assert_allclose(loaded.to_probabilities(loaded.logits(paths)), expected, atol=1e-5)
    meta = json.loads((ensemble / "meta.json").read_text())
    assert [m["path"] for m in meta["ensemble"]["members"]] == ["members/a", "members/b"]
    assert set(meta["ensemble"]["gain"]["members"]) == {"a", "b"}


def test_predict_and_evaluate_an_ensemble_from_the_cli(ensemble: Path) -> None:
    paths = images_of(ensemble)
    code, printed = run_and_capture(["predict", str(ensemble), *paths, "--json", "--engine", "torch"])
    assert code == 0
    records = json.loads(printed)
    expected = open_run(ensemble).probabilities(paths)
    assert [r["probability"] for r in records] == pytest.approx(expected.max(1).tolist(), abs=1e-5)
    code, printed = run_and_capture(["evaluate", str(ensemble), str(ensemble.parent / "data"), "--json"])
    assert code == 0
    metrics = json.loads(printed)
    val = json.loads((ensemble / "split.json").read_text())["val"]
    assert metrics["split"] == "val" and metrics["n"] == len(val)  # the members' own validation split
    assert (ensemble / "metrics.json").is_file() and (ensemble / "predictions.csv").is_file()
    html = (ensemble / "report.html").read_text()
    assert 'id="ensemble"' in html and "members/a" in html


def test_explain_an_ensemble_explains_its_first_member(ensemble: Path, tmp_path: Path) -> None:
    code, printed = run_and_capture(["explain", str(ensemble), *images_of(ensemble)[:2], "--out",
                                     str(tmp_path / "cams"), "--json"])
    assert code == 0
    assert len(list((tmp_path / "cams").glob("*_gradcam.png"))) == 2
    assert open_run(ensemble).explained.path == ensemble / "members" / "a"


def test_export_an_ensemble_and_predict_from_it_without_torch(ensemble: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(ensemble, copy)
    code, printed = run_and_capture(["export", str(copy), "--json"])
    assert code == 0
    assert (copy / "members" / "a" / "model.onnx").is_file() and (copy / "members" / "b" / "model.onnx").is_file()
    report = json.loads(printed)  # its size is the members' files', and says so
    member_mb = sum((copy / "members" / m / "model.onnx").stat().st_size for m in "ab") / 2**20
    assert report["members"] == 2 and report["size_mb"] == pytest.approx(member_mb, abs=0.02)
    spec = json.loads((copy / "ensemble.onnx.json").read_text())
    assert [m["run"] for m in spec["members"]] == ["members/a", "members/b"] and spec["engine"] == "onnx"
    predictor = load_predictor(copy)
    assert isinstance(predictor, EnsemblePredictor)
    paths = images_of(ensemble)
    np.testing.assert_allclose(predictor.probabilities(paths), open_run(copy).probabilities(paths), atol=1e-4)
    code, printed = run_and_capture(["predict", str(copy), *paths, "--json"])
    assert code == 0 and len(json.loads(printed)) == len(paths)


def test_an_ensemble_without_its_export_asks_for_one(ensemble: Path, capsys) -> None:
    fails_with(capsys, ["predict", str(ensemble), images_of(ensemble)[0], "--engine", "onnx"], "is an ensemble",
               "transferkit export")


def test_what_an_ensemble_cannot_do_is_one_line(ensemble: Path, capsys, tmp_path: Path) -> None:
    fails_with(capsys, ["export", str(ensemble), "--format", "torchscript"], "ONNX only")
    fails_with(capsys, ["export", str(ensemble), "--out", str(tmp_path / "x.onnx")], "drop --out")
    fails_with(capsys, ["similarity", str(ensemble), *images_of(ensemble)[:2], "--out", str(tmp_path / "s.png")],
               "is an ensemble")


def test_serve_an_ensemble(ensemble: Path) -> None:
    from fastapi.testclient import TestClient

    path = images_of(ensemble)[0]
    expected = open_run(ensemble).probabilities([path])[0]
    with TestClient(create_app(load_predictor(ensemble, "torch"), run_dir=ensemble)) as client:
        response = client.post("/predict?gradcam=1", files=[("files", ("x.png", Path(path).read_bytes()))])
        assert response.status_code == 200, response.text
        prediction = response.json()["predictions"][0]
        assert prediction["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
        assert prediction["gradcam_png"]
        info = client.get("/model").json()
        assert info["classes"] == open_run(ensemble).classes and info["engine"] == "Ensemble"


@pytest.mark.parametrize("better", [True, False])
def test_the_race_keeps_both_finalists_only_when_their_average_is_better(
        tmp_path: Path, fast: dict, monkeypatch: pytest.MonkeyPatch, better: bool) -> None:
    real_gain = race.ensemble_gain
    monkeypatch.setattr(race, "ensemble_gain", lambda *a: {**real_gain(*a), "better": better})
    index = scan_dataset(make_class_folders(tmp_path / "data", classes=2, per_class=12), 0.3, 0.0, 0)
    options = {k: v for k, v in fast.items() if k not in ("backbone", "weights", "quiet")}
    finalists = {"first": {"backbone": "test_efficientnet", "weights": fast["weights"], "head_dropout": 0.0},
                 "second": {"backbone": "test_efficientnet", "weights": fast["weights"], "head_dropout": 0.3}}
    out = tmp_path / "run"
    out.mkdir()
    laps = race.race(finalists, index, out, True, {**options, "epochs_finetune": 2})
    run = race.finish_race(laps, "first", index, out, True, resolve_config(ensemble=True), Reporter(quiet=True))
    assert not (out / race.RACE_FOLDER).exists()
    meta = json.loads((out / "meta.json").read_text())
    if better:
        assert isinstance(run, Ensemble) and [m["path"] for m in meta["ensemble"]["members"]] == [
            "members/first", "members/second"]
        assert (out / "members" / "second" / "metrics.json").is_file() and (out / "metrics.json").is_file()
    else:
        assert "ensemble" not in meta and (out / "model.safetensors").is_file() and not (out / "members").exists()
