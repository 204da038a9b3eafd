"""The report sections of a multi-label run: the summary (mAP first) and the per-label table. The sections built
on one true class per image (confusion matrix, ROC curve, Grad-CAM gallery, top losses, class similarity) say why
they are not drawn."""

from __future__ import annotations

NOT_SINGLE_LABEL = "multi-label run: an image can have several labels (or none), so there is no single true class"


def multilabel_sections(metrics: dict | None) -> dict:
    """The sections `gather` fills from predictions for a single-label run, for a multi-label one."""
    skipped = {"missing": f"{NOT_SINGLE_LABEL} to draw this from; see the per-label table under Metrics"}
    return {"metrics": metrics_section(metrics), "roc": skipped, "gallery": skipped, "top_losses": skipped,
            "similarity": skipped}


def metrics_section(metrics: dict | None) -> dict:
    if metrics is None:
        return {"missing": "no metrics.json in the run folder: `transferkit evaluate RUN DATA` writes it"}
    return {
        "summary": [("mAP (macro average precision)", metrics["mAP"]),
                    ("subset accuracy (every label right)", metrics["subset_accuracy"]),
                    ("Hamming loss (labels wrong)", metrics["hamming_loss"]), ("loss (BCE)", metrics["loss"])],
        "auc": None,
        "n": metrics["n"],
        "split": metrics["split"],
        "per_class": metrics["per_label"],
        "confusion_missing": f"{NOT_SINGLE_LABEL} per image: no confusion matrix (see the per-label table)",
        "classes": metrics["classes"],
    }
