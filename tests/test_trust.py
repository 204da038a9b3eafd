"""Numbers a user can trust: held-out copies of training images are found before a figure is reported, the kept
weights are named, `evaluate` scores what it is handed, and undefined metrics say so instead of reading 0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_class_folders
from tests.test_report import train_tiny
from transferkit.api import kept_weights
from transferkit.cli.main import run_cli
from transferkit.config import TrainConfig
from transferkit.runs.evaluate import compute_metrics
from transferkit.runs.files import read_history, read_predictions
from transferkit.runs.run import Run
from transferkit.training.state import BestKeeper

LEAKED = 3


def leaky_splits(root: Path) -> tuple[Path, list[str]]:
    """train/val/test folders whose test split holds byte-identical copies of LEAKED training images."""
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        make_class_folders(root / split, classes=3, per_class=12 if split == "train" else 5, seed=seed)
    copies = []
    for i in range(LEAKED):
        source = root / "train" / f"class_{i}" / "img_000.png"
        copy = root / "test" / f"class_{i}" / "copy_of_train.png"
        shutil.copy(source, copy)
        copies.append(str(copy))
    return root, copies


@pytest.fixture(scope="module")
def leaky_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str) -> tuple[Run, list[str]]:
    root = tmp_path_factory.mktemp("leaky")
    data, copies = leaky_splits(root / "data")
    return train_tiny(data, root / "run", tiny_weights), copies


def test_train_counts_test_images_copied_from_training(leaky_run):
    run, copies = leaky_run
    metrics = json.loads((run.path / "metrics.json").read_text())
    leaked = metrics["leaked_from_train"]
    assert metrics["split"] == "test" and metrics["n"] == 15 + LEAKED
    assert leaked["count"] == LEAKED and leaked["of"] == metrics["n"] and not leaked["dropped"]
    assert sorted(leaked["files"]) == sorted(copies)
    paths, y_true, probs = read_predictions(run.path / "predictions.csv", run.classes)
    hits = probs.argmax(axis=1) == y_true
    clean = np.array([path not in copies for path in paths])
    assert leaked["accuracy_with"] == pytest.approx(hits.mean()) == pytest.approx(metrics["accuracy"])
    assert leaked["accuracy_without"] == pytest.approx(hits[clean].mean())
    page = (run.path / "report.html").read_text()
    assert f"{LEAKED} of {metrics['n']} test images are byte-identical copies of training images" in page
    row = f"<tr><th>accuracy without the {LEAKED} copies of training images</th><td>{leaked['accuracy_without']:.4f}"
    assert row in page


def test_drop_leaks_scores_without_the_copies(leaky_run, capsys):
    run, copies = leaky_run
    before = json.loads((run.path / "metrics.json").read_text())
    data = Path(copies[0]).parents[2]
    assert run_cli(["evaluate", str(run.path), str(data), "--drop-leaks", "--json"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    assert metrics["n"] == before["n"] - LEAKED and metrics["leaked_from_train"]["dropped"]
    assert metrics["accuracy"] == pytest.approx(before["leaked_from_train"]["accuracy_without"])
    paths, _, _ = read_predictions(run.path / "predictions.csv", run.classes)
    assert not set(paths) & set(copies)
    assert f"{LEAKED} of the {before['n']} test images are copies of training images: left out" in captured.err
    assert run_cli(["evaluate", str(run.path), str(data)]) == 0
    err = capsys.readouterr().err
    assert f"{LEAKED} of the {before['n']} test images are copies of training images" in err and "--drop-leaks" in err


def test_evaluate_on_other_data_scores_every_image(leaky_run, tmp_path, capsys):
    run, copies = leaky_run
    other = make_class_folders(tmp_path / "held_out", classes=3, per_class=6, seed=7)
    shutil.copy(copies[0], other / "class_0" / "again.png")  # a copy of a training image, in someone else's folder
    assert run_cli(["evaluate", str(run.path), str(other)]) == 0
    err = capsys.readouterr().err
    assert f"evaluated: all 19 images: {other} is not the data this run was trained on" in err
    assert "warning: 1 of the 19 images is a copy of a training image" in err
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["split"] == "all" and metrics["n"] == 19
    assert metrics["leaked_from_train"]["files"] == [str(other / "class_0" / "again.png")]
    assert run_cli(["evaluate", str(run.path), str(other), "--split", "val", "--json"]) == 0
    subset = json.loads(capsys.readouterr().out)
    assert subset["split"] == "val" and subset["n"] < 19 and "not the run's own split" in subset["split_note"]
    shutil.rmtree(other / "class_2")
    assert run_cli(["evaluate", str(run.path), str(other)]) == 0
    assert "AUC undefined: no class_2 images in the evaluated split" in capsys.readouterr().err


def test_evaluate_scores_photos_of_one_class_and_skips_an_empty_class_folder(leaky_run, tmp_path, capsys):
    """New photos of one class are data to score, not to train on: no "at least 2 classes" refusal."""
    run, _ = leaky_run
    other = make_class_folders(tmp_path / "new_photos", classes=3, per_class=4, seed=9)
    shutil.rmtree(other / "class_0")
    for image in (other / "class_1").iterdir():
        image.unlink()  # an empty class folder
    assert run_cli(["evaluate", str(run.path), str(other), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 4 and metrics["per_class"]["class_2"]["support"] == 4
    assert metrics["per_class"]["class_0"]["recall"] is None and metrics["auc"] is None
    paths, y_true, _ = read_predictions(run.path / "predictions.csv", run.classes)
    assert sorted(paths) == sorted(str(p) for p in (other / "class_2").iterdir()) and set(y_true) == {2}


def test_evaluate_names_the_classes_it_knows_when_a_folder_holds_another(leaky_run, tmp_path, capsys):
    run, _ = leaky_run
    other = make_class_folders(tmp_path / "new_photos", classes=2, per_class=2, seed=9)
    (other / "class_1").rename(other / "ducks")
    assert run_cli(["evaluate", str(run.path), str(other)]) == 2
    error = capsys.readouterr().err
    assert "classes not known to this model: ducks (it knows class_0, class_1, class_2)" in error
    assert len(error.strip().splitlines()) == 1


def test_evaluate_on_own_data_names_the_role_of_val(tmp_path, dataset, tiny_weights, capsys):
    run = train_tiny(dataset, tmp_path / "run", tiny_weights)
    assert run.metrics["split"] == "val"
    assert "also used to pick the best epoch" in run.metrics["split_note"]
    assert run.metrics["leaked_from_train"]["count"] == 0
    assert run_cli(["evaluate", str(run.path), str(dataset), "--split", "train", "--json"]) == 0
    on_train = json.loads(capsys.readouterr().out)
    assert on_train["leaked_from_train"] is None and "include the training split" in on_train["leak_check"]


def test_kept_weights_are_the_best_epoch_of_history(leaky_run):
    run, _ = leaky_run
    history = read_history(run.path / "history.csv")
    best = min(history, key=lambda row: row["val_loss"])
    kept = json.loads((run.path / "meta.json").read_text())["kept"]
    assert (kept["stage"], kept["epoch"], kept["monitor"]) == (best["stage"], int(best["epoch"]), "val_loss")
    assert kept["value"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert json.loads((run.path / "metrics.json").read_text())["kept"] == kept
    assert kept["reason"] in (run.path / "report.html").read_text()


def test_undone_fine_tuning_is_said_in_words():
    keeper = BestKeeper("val_loss", 5)
    keeper.best, keeper.best_epoch = 0.7457, ("frozen", 26)
    kept = kept_weights(keeper, TrainConfig(epochs_finetune=3), interrupted=False)
    assert kept["reason"].startswith("fine-tuning did not beat the frozen head")
    assert "the head from frozen epoch 26 was kept" in kept["reason"]
    keeper.best_epoch = ("finetune", 2)
    assert "fine-tuning did not beat" not in kept_weights(keeper, TrainConfig(epochs_finetune=3), False)["reason"]


def test_missing_class_makes_auc_null_with_a_reason_and_precision_undefined():
    classes = ["apple", "banana", "cherry"]
    y_true = np.array([0, 0, 1, 1])  # no cherry in the split, and none predicted
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1]])
    metrics = compute_metrics(y_true, probs, classes)
    assert metrics["auc"] is None and "no cherry images" in metrics["auc_note"]
    cherry = metrics["per_class"]["cherry"]
    assert cherry["precision"] is None and cherry["recall"] is None and cherry["support"] == 0
    assert metrics["per_class"]["banana"]["precision"] == pytest.approx(2 / 3)
    assert "auc_note" not in compute_metrics(np.array([0, 1, 2, 2]), probs, classes)


def test_train_cli_warns_of_copies_and_says_fine_tuning_was_undone(tmp_path, tiny_weights, capsys):
    from tests.test_cli import fast_args

    data, _ = leaky_splits(tmp_path / "data")
    # a fine-tuning rate far too high: stage 2 cannot beat the frozen head, so its weights are undone
    args = [*fast_args(tiny_weights), "--epochs-frozen", "6", "--lr", "0.03", "--finetune-lr", "5", "--patience", "0"]
    assert run_cli(["train", str(data), "--out", str(tmp_path / "run"), *args, "--json"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    assert f"warning: {LEAKED} of the {metrics['n']} test images are copies of training images" in captured.err
    assert metrics["kept"]["stage"] == "frozen"
    assert "kept: fine-tuning did not beat the frozen head" in captured.err
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Stage 2: fine-tuning (undone" in page and metrics["kept"]["reason"] in page
