"""Choices made on validation logits after training: a temperature that calibrates probabilities (Guo et al., 2017,
"On Calibration of Modern Neural Networks") and, for binary tasks, the decision threshold of an operating point.

numpy and scikit-learn only (no torch), so the config can check an operating point without importing a model.
"""

from __future__ import annotations

import numpy as np

from transferkit.options import parse_operating_point

ECE_BINS = 15  # Guo et al.'s choice; the usual one in the papers that report ECE
TEMPERATURE_RANGE = (0.05, 20.0)


def log_likelihoods(logits: np.ndarray, targets: np.ndarray, kind: str) -> np.ndarray:
    """Per-image log-likelihood of the true class(es): kind 'binary' (one logit), 'multiclass' (softmax) or
    'multilabel' (a sigmoid per label, summed over labels)."""
    from scipy.special import log_expit, log_softmax

    logits = np.asarray(logits, dtype=np.float64)
    if kind == "multiclass":
        return np.take_along_axis(log_softmax(logits, axis=1), targets.astype(int)[:, None], axis=1)[:, 0]
    positive = (targets > 0.5).reshape(logits.shape)
    return np.where(positive, log_expit(logits), log_expit(-logits)).sum(axis=1)


def fit_temperature(logits: np.ndarray, targets: np.ndarray, kind: str) -> float:
    """The one scalar T > 0 minimising the negative log-likelihood of logits / T on (validation) images. Dividing
    every logit by the same T never changes a single-label argmax, so accuracy is untouched."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        return -float(log_likelihoods(logits / np.exp(log_t), targets, kind).mean())

    # Every validation decision right: ever sharper is ever better, with no minimum, which is no evidence for any
    # temperature; keep the logits as they are rather than make them extreme.
    if _all_right(np.asarray(logits), targets, kind):
        return 1.0
    found = minimize_scalar(nll, bounds=np.log(TEMPERATURE_RANGE), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x)) if found.fun < nll(0.0) else 1.0


def _all_right(logits: np.ndarray, targets: np.ndarray, kind: str) -> bool:
    if kind == "multiclass":
        return bool((logits.argmax(axis=1) == targets).all())
    return bool(((logits > 0) == (targets > 0.5).reshape(logits.shape)).all())


def confidences(probs: np.ndarray, y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Single-label: each image's top probability and whether the top class is right (the reliability diagram's
    x and y)."""
    return probs.max(axis=1), (probs.argmax(axis=1) == y_true).astype(float)


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width confidence bins: (mean confidence, accuracy, count) per non-empty bin."""
    confidence, correct = confidences(probs, y_true)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    kept = count > 0
    mean_conf = np.bincount(which, confidence, minlength=bins)[kept] / count[kept]
    accuracy = np.bincount(which, correct, minlength=bins)[kept] / count[kept]
    return mean_conf, accuracy, count[kept]


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE (top-label, equal-width bins): the count-weighted mean |accuracy - confidence| over the bins.
    scikit-learn has the reliability curve (calibration_curve) but not this number, and only for binary tasks."""
    mean_conf, accuracy, count = reliability_bins(probs, y_true, bins)
    return float((count * np.abs(accuracy - mean_conf)).sum() / count.sum())


def choose_threshold(positive_probability: np.ndarray, is_positive: np.ndarray, point: str) -> float | None:
    """The probability cut (positive at or above it) of an operating point on (validation) images; None for the
    default (the class with the larger probability). Between two images' scores, the cut sits halfway, leaving a
    margin on both sides for unseen images."""
    name, target = parse_operating_point(point)
    if name == "default" or is_positive.all() or not is_positive.any():
        return None
    from sklearn.metrics import roc_curve

    fpr, tpr, scores = roc_curve(is_positive, positive_probability, drop_intermediate=False)
    positives, negatives = is_positive.sum(), (~is_positive.astype(bool)).sum()
    cuts = (np.minimum(scores, 1.0) + np.append(scores[1:], 0.0)) / 2  # cut i keeps scores[i] positive
    if name == "accuracy":
        best = np.argmax(tpr * positives + (1 - fpr) * negatives)
    elif name == "balanced":
        best = np.argmax(tpr - fpr)  # Youden's J: balanced accuracy is (1 + J) / 2
    elif name == "recall":
        best = np.flatnonzero(tpr >= target - 1e-12)[0]  # the highest cut that reaches the recall
    else:
        predicted = tpr * positives + fpr * negatives
        precision = np.divide(tpr * positives, predicted, out=np.ones_like(tpr), where=predicted > 0)
        reaching = np.flatnonzero(precision >= target - 1e-12)
        # the lowest cut with that precision (most recall); none reaches it: the most precise cut
        best = reaching[-1] if len(reaching) else int(np.argmax(precision[1:]) + 1)
    return float(cuts[best])


def decide(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Single-label class indices: a binary task's threshold on the second class's probability, else argmax."""
    if threshold is None:
        return probs.argmax(axis=1)
    return (probs[:, 1] >= threshold).astype(int)


def rescaled(probs: np.ndarray, factor: float) -> np.ndarray:
    """Single-label probabilities as they are with every logit multiplied by `factor`: softmax(factor * log p)
    (for a one-logit binary run too). With the run's temperature, this recovers the uncalibrated probabilities
    from the calibrated ones in predictions.csv."""
    scaled = np.log(np.clip(probs, 1e-12, 1.0)) * factor
    scaled = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return scaled / scaled.sum(axis=1, keepdims=True)


def defined(score: float) -> float | None:
    """A per-class score for metrics.json: None where it is 0/0 (no image of the class, nothing predicted as it),
    which scikit-learn gives as NaN with zero_division=np.nan; never a misleading 0."""
    return None if np.isnan(score) else float(score)
