"""Metrics (scikit-learn) and figures (matplotlib, Agg) for a set of predictions."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support, roc_auc_score  # noqa: E402

from transferkit.task.calibration import decide, defined, expected_calibration_error  # noqa: E402


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float | None = None
                    ) -> dict:
    """accuracy, balanced accuracy, top-5 (5+ classes), ROC AUC (binary; macro one-vs-rest otherwise), loss, ECE,
    per-class, confusion. Decisions are the larger probability's class, or a binary run's `threshold`."""
    labels = list(range(len(classes)))
    y_pred = decide(probs, threshold)
    # 0/0 (no predictions, or no support) is undefined: NaN here, null in metrics.json, never a misleading 0
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                     zero_division=np.nan)
    auc, auc_note = _auc(y_true, probs, labels, classes)
    metrics = {
        "accuracy": float((y_pred == y_true).mean()),
        "balanced_accuracy": float(recall[support > 0].mean()),  # scikit-learn's, without its absent-class warning
        "top5_accuracy": _top_k(y_true, probs, 5) if len(classes) >= 5 else None,
        "auc": auc,
        **({"auc_note": auc_note} if auc_note else {}),
        "loss": float(log_loss(y_true, np.clip(probs, 1e-7, 1), labels=labels)),
        "ece": expected_calibration_error(probs, y_true),
        "per_class": {
            name: {
                "precision": defined(precision[i]),
                "recall": defined(recall[i]),
                "f1": defined(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": list(classes),
        "n": int(len(y_true)),
    }
    return metrics


def _top_k(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == y_true[:, None]).any(axis=1).mean())


def _auc(y_true: np.ndarray, probs: np.ndarray, labels: list[int], classes: list[str]) -> tuple[float | None, str]:
    """(AUC, "") or, when it is undefined, (None, why): a class missing from the evaluated split has no ROC curve,
    and a number over the others would not be comparable."""
    present = set(np.unique(y_true).tolist())
    absent = [classes[i] for i in labels if i not in present]
    if len(present) < 2 or (len(labels) > 2 and absent):
        return None, f"undefined: no {', '.join(absent)} images in the evaluated split"
    if len(labels) == 2:
        return float(roc_auc_score(y_true, probs[:, 1])), ""
    return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels)), ""


def plot_curves(history: list[dict], path: Path | BinaryIO, kept: dict | None = None) -> None:
    """Loss and accuracy per epoch (integer ticks), train and val, with a line where fine-tuning starts and a star
    on the epoch whose weights were kept (`kept`: meta.json's record, when that epoch is in `history`)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(1, len(history) + 1)
    stages = [h["stage"] for h in history]
    kept_at = [i for i, h in enumerate(history) if kept and (h["stage"], int(h["epoch"])) == (kept["stage"],
                                                                                                kept["epoch"])]
    for ax, metric in zip(axes, ("loss", "acc"), strict=True):
        ax.plot(x, [h[f"train_{metric}"] for h in history], marker="o", label=f"train {metric}")
        val = [h[f"val_{metric}"] for h in history]
        ax.plot(x, val, marker="o", label=f"val {metric}")
        if "finetune" in stages and "frozen" in stages:
            ax.axvline(stages.index("finetune") + 0.5, color="grey", linestyle="--", label="start fine-tuning")
        for i in kept_at:
            ax.plot(x[i], val[i], marker="*", markersize=16, color="#d9a400", markeredgecolor="black", linestyle="",
                    label=f"kept: {kept['stage']} epoch {kept['epoch']}", zorder=5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.25 ticks on short runs
        ax.set_xlabel("epoch")
        ax.set_title("loss" if metric == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], classes: list[str], path: Path | BinaryIO) -> None:
    """Counts, coloured by row-normalised rate so a small class's mistakes are as visible as a large one's."""
    counts = np.asarray(matrix)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 30:
        for i, j in np.ndindex(counts.shape):
            ax.text(
                j,
                i,
                f"{counts[i, j]}\n{rates[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    ax.set_title("confusion matrix (count, row %)")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
