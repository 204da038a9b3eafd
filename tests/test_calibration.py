"""Temperature scaling, expected calibration error and binary operating points (transferkit.task.calibration), on
synthetic logits whose right answer is known, and the flags' refusals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, softmax

from tests.conftest import make_class_folders
from tests.test_cli import fails_with
from transferkit.errors import UserError
from transferkit.task.calibration import (
    choose_threshold,
    decide,
    expected_calibration_error,
    fit_temperature,
    log_likelihoods,
    parse_operating_point,
    rescaled,
)

OVERCONFIDENCE = 4.0


def calibrated_logits(kind: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets drawn from the logits' own probabilities: calibrated by construction."""
    rng = np.random.default_rng(seed)
    if kind == "multiclass":
        logits = rng.normal(scale=2.0, size=(n, 4))
        cumulative = softmax(logits, axis=1).cumsum(axis=1)
        return logits, (rng.random((n, 1)) > cumulative).sum(axis=1)
    logits = rng.normal(scale=2.0, size=(n, 1 if kind == "binary" else 3))
    targets = (rng.random(logits.shape) < expit(logits)).astype(float)
    return logits, targets[:, 0].astype(int) if kind == "binary" else targets


def as_probs(logits: np.ndarray, kind: str) -> np.ndarray:
    if kind == "multiclass":
        return softmax(logits, axis=1)
    p = expit(logits[:, 0])
    return np.stack([1 - p, p], axis=1)


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel"])
def test_temperature_undoes_a_deliberately_overconfident_model(kind):
    logits, targets = calibrated_logits(kind, 6000)
    overconfident = OVERCONFIDENCE * logits
    fit, held_out = slice(0, 3000), slice(3000, None)
    temperature = fit_temperature(overconfident[fit], targets[fit], kind)
    assert temperature == pytest.approx(OVERCONFIDENCE, rel=0.15)
    before = -log_likelihoods(overconfident[held_out], targets[held_out], kind).mean()
    after = -log_likelihoods(overconfident[held_out] / temperature, targets[held_out], kind).mean()
    assert after < before - 0.1
    if kind == "multilabel":
        return
    raw, calibrated = as_probs(overconfident[held_out], kind), as_probs(overconfident[held_out] / temperature, kind)
    assert expected_calibration_error(calibrated, targets[held_out]) < expected_calibration_error(
        raw, targets[held_out]) / 3
    assert (calibrated.argmax(axis=1) == raw.argmax(axis=1)).all()  # accuracy is untouched
    assert rescaled(calibrated, temperature) == pytest.approx(raw, abs=1e-9)  # the report's "before" curve


def test_an_underconfident_model_gets_a_temperature_below_one():
    logits, targets = calibrated_logits("multiclass", 3000, seed=1)
    assert fit_temperature(logits / 3, targets, "multiclass") == pytest.approx(1 / 3, rel=0.15)


def test_separable_validation_gives_no_temperature():
    # every image right: ever sharper probabilities lower the loss without end, which is no evidence for any T
    logits = np.array([[3.0, -1.0], [-2.0, 1.0], [2.5, 0.0], [-1.0, 4.0]])
    assert fit_temperature(logits, np.array([0, 1, 0, 1]), "multiclass") == 1.0


def test_ece_of_known_bins():
    # two bins: confidence 0.9 with 9 of 10 right (gap 0), 0.6 with 2 of 10 right (gap 0.4) -> 0.2
    probs = np.array([[0.9, 0.1]] * 10 + [[0.6, 0.4]] * 10)
    y_true = np.array([0] * 9 + [1] + [0] * 2 + [1] * 8)
    assert expected_calibration_error(probs, y_true) == pytest.approx(0.2)


def scored(seed: int = 0, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping scores of an imbalanced binary task (30% positive)."""
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < 0.3
    return expit(rng.normal(np.where(positive, 1.0, -1.0), 1.2)), positive


def rates(scores: np.ndarray, positive: np.ndarray, cut: float) -> dict[str, float]:
    predicted = scores >= cut
    recall, specificity = predicted[positive].mean(), (~predicted[~positive]).mean()
    return {"recall": recall, "precision": positive[predicted].mean() if predicted.any() else 1.0,
            "accuracy": (predicted == positive).mean(), "balanced": (recall + specificity) / 2}


@pytest.mark.parametrize("point", ["accuracy", "balanced"])
def test_accuracy_and_balanced_points_are_the_best_cut(point):
    scores, positive = scored()
    chosen = rates(scores, positive, choose_threshold(scores, positive, point))[point]
    every_cut = [rates(scores, positive, cut)[point] for cut in np.append(scores, 1.1)]
    assert chosen == pytest.approx(max(every_cut))


@pytest.mark.parametrize(("point", "metric", "target"), [("recall=0.9", "recall", 0.9),
                                                         ("precision=0.8", "precision", 0.8)])
def test_recall_and_precision_points_reach_their_target_with_the_most_of_the_other(point, metric, target):
    scores, positive = scored()
    cut = choose_threshold(scores, positive, point)
    reached = rates(scores, positive, cut)
    assert reached[metric] >= target
    other = "precision" if metric == "recall" else "recall"
    reaching = [rates(scores, positive, c) for c in scores if rates(scores, positive, c)[metric] >= target]
    assert reached[other] == pytest.approx(max(r[other] for r in reaching))


def test_default_point_is_the_larger_probability():
    scores, positive = scored()
    probs = np.stack([1 - scores, scores], axis=1)
    assert choose_threshold(scores, positive, "default") is None
    assert (decide(probs, None) == probs.argmax(axis=1)).all()
    assert (decide(probs, 0.7) == (scores >= 0.7)).all()


@pytest.mark.parametrize("value", ["foo", "recall=1.5", "recall=", "precision=abc", "accuracy=0.3", "recall=0",
                                   "precision"])
def test_bad_operating_points_are_refused(value):
    with pytest.raises(UserError, match="operating point must be one of"):
        parse_operating_point(value)


@pytest.mark.parametrize(("flags", "fragment"), [(["--operating-point", "recall=1.5"], "recall=1.5"),
                                                 (["--operating-point", "foo"], "foo"),
                                                 (["--tta", "sideways"], "tta must be one of")])
def test_bad_train_flags_are_one_line_and_exit_2(binary_dataset, tmp_path, capsys, flags, fragment):
    fails_with(capsys, ["train", str(binary_dataset), "--out", str(tmp_path / "run"), *flags], fragment)
    assert not (tmp_path / "run").exists()


def test_operating_point_needs_two_classes(tmp_path, capsys, tiny_weights):
    data = make_class_folders(tmp_path / "data", classes=3, per_class=4)
    fails_with(capsys, ["train", str(data), "--out", str(tmp_path / "run"), "--backbone", "test_efficientnet",
                        "--weights", tiny_weights, "--operating-point", "balanced"], "needs a two-class task")
    assert not (tmp_path / "run").exists()
