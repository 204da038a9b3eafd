"""Multi-label classification: one sigmoid logit per label, BCE-with-logits, and a decision threshold per label
chosen on the validation set (the one maximising that label's F1), since a rare label's best cut is rarely 0.5."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from transferkit.task.calibration import defined

if TYPE_CHECKING:  # training needs torch and metrics need scikit-learn; deciding labels (predict, serve) neither
    import torch

TASK = "multilabel"


def loss(label_smoothing: float = 0.0, pos_weight: torch.Tensor | None = None):
    """BCE-with-logits over every (image, label) pair; smoothing pulls each target towards 0.5; `pos_weight` (per
    label) weighs positives against negatives."""

    from torch.nn import functional as F

    def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        soft = targets.float() * (1 - label_smoothing) + 0.5 * label_smoothing
        weight = None if pos_weight is None else pos_weight.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits, soft, pos_weight=weight)

    return bce


def hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each image's fraction of labels right at p > 0.5, so the training log's accuracy is per-label accuracy
    (1 - Hamming loss)."""
    return ((logits > 0) == (targets > 0.5)).float().mean(dim=1)


def balanced_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The mean over labels of each label's balanced accuracy: the mean of its recall on the images that have it
    and on those that do not (whichever occur)."""
    right, positive = (logits > 0) == (targets > 0.5), targets > 0.5
    per_label = []
    for j in range(targets.shape[1]):
        recalls = [right[positive[:, j] == side, j].float().mean() for side in (True, False)
                   if (positive[:, j] == side).any()]
        per_label.append(sum(recalls) / len(recalls))
    return float(sum(per_label) / len(per_label))


def choose_thresholds(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per label, the probability cut maximising F1 on (validation) images; 0.5 for a label with no positives."""
    return np.array([_best_f1_threshold(probs[:, j], targets[:, j] > 0.5) for j in range(probs.shape[1])])


def _best_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    if not positive.any():
        return 0.5
    # Predicting "positive" for scores >= t: try t at every score, highest first, counting hits cumulatively.
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(positive[order])
    f1 = 2 * hits / (np.arange(1, len(scores) + 1) + positive.sum())
    best = int(np.argmax(f1))
    # Halfway to the next lower score (not the score itself): a margin for unseen images on both sides.
    below = scores[order[best + 1]] if best + 1 < len(scores) else 0.0
    return float((scores[order[best]] + below) / 2)


def decide(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(N, labels) booleans: each label whose probability reaches its threshold."""
    return probs >= thresholds[None, :]


def label_names(decisions: np.ndarray, classes: list[str]) -> list[str]:
    """`a|b` per image (the canonical label-set form of a CSV), empty when no label reaches its threshold."""
    return ["|".join(c for c, on in zip(classes, row, strict=True) if on) for row in decisions]


def compute_metrics(targets: np.ndarray, probs: np.ndarray, classes: list[str], thresholds: np.ndarray) -> dict:
    """mAP (macro average precision, over labels present in the split), subset accuracy, Hamming loss, BCE loss and
    per-label precision / recall / F1 / support / AP at the run's thresholds."""
    from sklearn.metrics import average_precision_score, hamming_loss, precision_recall_fscore_support

    truth, decisions = targets > 0.5, decide(probs, thresholds)
    precision, recall, f1, support = precision_recall_fscore_support(truth, decisions, average=None,
                                                                     zero_division=np.nan)
    present = truth.any(axis=0)
    ap = [float(average_precision_score(truth[:, j], probs[:, j])) if present[j] else None for j in range(len(classes))]
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    return {
        "task": TASK,
        "mAP": float(average_precision_score(truth[:, present], probs[:, present], average="macro"))
        if present.any() else None,
        "subset_accuracy": float((decisions == truth).all(axis=1).mean()),
        "hamming_loss": float(hamming_loss(truth, decisions)),
        "loss": float(-np.where(truth, np.log(clipped), np.log1p(-clipped)).mean()),  # the training BCE
        "per_label": {
            name: {"precision": defined(precision[j]), "recall": defined(recall[j]), "f1": defined(f1[j]),
                   "support": int(support[j]), "average_precision": ap[j], "threshold": float(thresholds[j])}
            for j, name in enumerate(classes)
        },
        "classes": list(classes),
        "n": int(len(targets)),
    }


def summary_line(metrics: dict) -> str:
    m_ap = "—" if metrics["mAP"] is None else f"{metrics['mAP']:.4f}"
    return (f"{metrics['split']} mAP {m_ap}, subset accuracy {metrics['subset_accuracy']:.4f}, "
            f"Hamming loss {metrics['hamming_loss']:.4f}, loss {metrics['loss']:.4f} (n={metrics['n']})")


def predictions(paths: list[str], probs: np.ndarray, classes: list[str], thresholds: np.ndarray) -> list[dict]:
    """The `predict --json` shape of a multi-label run: every label above its threshold, and each label's p."""
    decisions = decide(probs, thresholds)
    return [{"path": path, "labels": [c for c, on in zip(classes, row, strict=True) if on],
             "probabilities": {c: float(v) for c, v in zip(classes, p, strict=True)}}
            for path, row, p in zip(paths, decisions, probs, strict=True)]


def thresholds_of(thresholds: dict[str, float], classes: list[str]) -> np.ndarray:
    """meta.json's (or an export's) {label: threshold} as an array in class order."""
    return np.array([float(thresholds[c]) for c in classes])
