"""Multi-label CSVs (`red|blue`): sigmoid head, per-label thresholds from validation, mAP, predict, report, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score

from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.data.sources import scan_dataset
from transferkit.task import multilabel

RED, BLUE = (230, 30, 30), (40, 40, 230)
COMBINATIONS = {"red": (RED,), "blue": (BLUE,), "red|blue": (RED, BLUE)}


def patches(path: Path, colours: tuple, rng: np.random.Generator) -> Path:
    """Dark noise with a red patch on the left and/or a blue one on the right."""
    pixels = (rng.random((40, 40, 3)) * 30).astype(np.uint8)
    for colour in colours:
        left = 1 if colour == RED else 21
        top = int(rng.integers(1, 12))
        pixels[top : top + 18, left : left + 18] = colour
    Image.fromarray(pixels).save(path)
    return path


def multilabel_csv(root: Path, per_combination: int = 12, header: str = "path,label") -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [header]
    for label, colours in COMBINATIONS.items():
        for i in range(per_combination):
            name = f"{label.replace('|', '+')}_{i}.png"
            patches(root / name, colours, rng)
            rows.append(f"{name},{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def one_line_exit_2(capsys, argv: list[str]) -> str:
    code = run_cli(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("transferkit: error:"), err
    return err


def test_scan_splits_each_label_combination_and_keeps_every_label_in_train(tmp_path: Path) -> None:
    index = scan_dataset(multilabel_csv(tmp_path / "d", per_combination=5))
    assert index.multilabel and index.classes == ["blue", "red"]
    assert {s.label for s in index.samples} == {"red", "blue", "blue|red"}  # canonical: sorted
    for combination in ("red", "blue", "blue|red"):  # stratified on the whole label set: 1 of each 5 in val
        assert sum(s.label == combination for s in index.split("val")) == 1
    assert index.counts()["train"] == {"blue": 8, "red": 8}  # an image counts under each of its labels


def test_an_empty_label_part_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    csv_path = multilabel_csv(tmp_path / "d", per_combination=2)
    with csv_path.open("a") as handle:
        handle.write("red_0.png,red|\n")
    err = one_line_exit_2(capsys, ["train", str(csv_path), "--out", str(tmp_path / "run")])
    assert "empty label in 'red|'" in err and "labels.csv:8" in err


def test_thresholds_maximise_each_labels_f1() -> None:
    probs = np.array([[0.9, 0.2], [0.6, 0.8], [0.55, 0.7], [0.1, 0.65], [0.3, 0.1]])
    truth = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [1, 0]])
    chosen = multilabel.choose_thresholds(probs, truth)
    for j in range(2):
        best = max(f1_score(truth[:, j], probs[:, j] >= t) for t in np.unique(probs[:, j]))
        assert f1_score(truth[:, j], probs[:, j] >= chosen[j]) == pytest.approx(best)
    metrics = multilabel.compute_metrics(truth, probs, ["a", "b"], chosen)
    assert metrics["mAP"] == pytest.approx(average_precision_score(truth, probs, average="macro"))
    assert metrics["per_label"]["b"]["support"] == 2 and metrics["task"] == "multilabel"


def test_a_score_that_is_0_over_0_is_null_not_0() -> None:
    """A label no image has, or that nothing was predicted as: undefined (null in metrics.json), as single-label."""
    probs = np.array([[0.9, 0.1, 0.8], [0.2, 0.1, 0.9]])
    truth = np.array([[1, 0, 0], [0, 0, 0]])
    scores = multilabel.compute_metrics(truth, probs, ["a", "b", "c"], np.full(3, 0.5))["per_label"]
    assert scores["a"] == {**scores["a"], "precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert (scores["b"]["precision"], scores["b"]["recall"], scores["b"]["support"]) == (None, None, 0)
    assert (scores["c"]["precision"], scores["c"]["recall"]) == (0.0, None)


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str):
    root = tmp_path_factory.mktemp("multilabel")
    data = multilabel_csv(root / "data")
    # The random tiny backbone's pooled features hold the second patch faintly: a high rate and many (cheap, cached)
    # head epochs make the labels separate clearly enough for thresholds to generalise to new images.
    fast = dict(backbone="test_efficientnet", weights=tiny_weights, image_size=32, batch_size=8, workers=0,
                epochs_frozen=40, epochs_finetune=1, augment="none", quiet=True, lr=0.3, head_dropout=0.0, patience=0)
    return api.train(data, root / "run", **fast), root


def test_a_multilabel_csv_trains_a_sigmoid_head_in_both_stages(multilabel_run) -> None:
    run, _ = multilabel_run
    meta = json.loads((run.path / "meta.json").read_text())
    assert meta["task"] == "multilabel" and run.model.head[-1].out_features == 2
    assert set(meta["thresholds"]) == {"blue", "red"} and all(0 < t < 1 for t in meta["thresholds"].values())
    history = (run.path / "history.csv").read_text()
    assert ",frozen," in history and ",finetune," in history
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["mAP"] > 0.9, metrics
    assert set(metrics["per_label"]) == {"blue", "red"} and all("f1" in m for m in metrics["per_label"].values())
    assert 0 <= metrics["hamming_loss"] <= 1 and 0 <= metrics["subset_accuracy"] <= 1


def test_predict_returns_every_label_above_its_threshold(multilabel_run, capsys) -> None:
    run, root = multilabel_run
    rng = np.random.default_rng(7)
    both = patches(root / "both.png", (RED, BLUE), rng)
    red = patches(root / "red.png", (RED,), rng)
    assert run_cli(["predict", str(run.path), str(both), str(red), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert sorted(records[0]["labels"]) == ["blue", "red"] and records[1]["labels"] == ["red"]
    assert set(records[0]) == {"path", "labels", "probabilities"}
    assert set(records[0]["probabilities"]) == {"blue", "red"}


def test_the_report_shows_map_and_labels_and_says_why_sections_are_missing(multilabel_run) -> None:
    run, _ = multilabel_run
    page = (run.path / "report.html").read_text()
    assert "mAP (macro average precision)" in page and "subset accuracy" in page
    assert "no confusion matrix" in page and page.count("multi-label run:") >= 4
    assert not (run.path / "confusion.png").exists()


def test_evaluating_multilabel_data_with_a_single_label_run_is_refused(multilabel_run, tmp_path: Path, capsys,
                                                                      fast: dict) -> None:
    from tests.conftest import make_class_folders

    _, root = multilabel_run
    data = make_class_folders(tmp_path / "single", classes=2, per_class=6)
    single = api.train(data, tmp_path / "single-run", **{**fast, "epochs_frozen": 1, "epochs_finetune": 0})
    err = one_line_exit_2(capsys, ["evaluate", str(single.path), str(root / "data" / "labels.csv")])
    assert "multi-label" in err


def test_export_writes_per_label_probabilities_with_thresholds(multilabel_run, tmp_path) -> None:
    from transferkit.export.onnx import export_run
    from transferkit.predictor import OnnxPredictor

    run, root = multilabel_run
    report = export_run(run.path, out=tmp_path / "m.onnx")
    assert report.check.max_abs_diff <= 1e-4 and report.check.agreement == 1.0
    predictor = OnnxPredictor(tmp_path / "m.onnx")
    assert np.allclose(predictor.thresholds, multilabel.thresholds_of(run.meta["thresholds"], run.classes))
    paths = sorted(str(p) for p in (root / "data").glob("*.png"))[:6]
    assert np.abs(predictor.probabilities(paths) - run.probabilities(paths)).max() <= 1e-4
