"""report.html: one page about a run (its data, training, metrics, mistakes, what the model looks at) that opens
from disk with no network: pictures inline as data URIs, CSS inline, no scripts. Everything comes from the run
folder's files; a file the run lacks turns its sections into a line saying so, never an error."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import numpy as np
import yaml

from transferkit.data.labelsets import label_set
from transferkit.fileio import atomic_write
from transferkit.prediction import ENSEMBLE
from transferkit.report.ensemble import ensemble_model_rows, ensemble_section
from transferkit.report.figures import confusion_uri, precision_recall_uri, reliability_uri, roc_uri, stage_curves
from transferkit.report.images import Predictions, gallery_section, similarity_section, top_losses_section
from transferkit.report.multilabel import multilabel_sections
from transferkit.runs.files import read_history, read_prediction_crops, read_predictions
from transferkit.task.calibration import reliability_bins, rescaled

if TYPE_CHECKING:
    from transferkit.runs.run import Run

STAGE_TITLES = {"frozen": "Stage 1: the new head on the frozen backbone", "finetune": "Stage 2: fine-tuning"}
UNDONE = " (undone: the model is the frozen stage's head, see above)"
SKIPPED_SHOWN = 100
CONFUSION_TABLE_MAX = 30  # classes; beyond this the figure alone (its cells unlabelled) is readable
MEMBERS_TRAINED = "an ensemble: each member's training is in its own report, members/NAME/report.html"
NO_PREDICTIONS = ("no predictions.csv in the run folder: `transferkit report RUN --data DATA` (or `transferkit "
                  "evaluate RUN DATA`) evaluates the run and writes it")


def write_report(run: Run) -> Path:
    """Write RUN/report.html from the run folder as it is now; returns its path."""
    path = run.path / "report.html"
    atomic_write(path, render(gather(run)))
    return path


def render(context: dict) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("transferkit.report", "."), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda value, digits=4: "—" if value is None else f"{value:.{digits}f}"
    return env.get_template("template.html.j2").render(context)


def gather(run: Run) -> dict:
    metrics = read_json(run.path / "metrics.json")
    return {
        "title": run.path.resolve().name,
        "classes": run.classes,
        "dataset": dataset_section(run.path, run.classes, metrics, label_set if run.multilabel else None),
        "training": missing(MEMBERS_TRAINED) if ENSEMBLE in run.meta else training_section(run.path,
                                                                                            run.meta.get("kept")),
        "notes": evaluation_notes(metrics),
        **(multilabel_sections(metrics) if run.multilabel else single_label_sections(run, metrics)),
        "model": model_section(run),
        "leaderboard": leaderboard_section(run.path),
        "ensemble": ensemble_section(run.path, run.meta, metrics),
    }


def single_label_sections(run: Run, metrics: dict | None) -> dict:
    predictions = load_predictions(run)
    return {
        "metrics": metrics_section(metrics, run.path),
        "calibration": calibration_section(predictions, run.temperature, metrics),
        "roc": roc_section(predictions, run.classes) if len(run.classes) == 2 else None,
        **prediction_sections(run, predictions),
    }


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def missing(message: str) -> dict:
    return {"missing": message}


def load_predictions(run: Run) -> Predictions | None:
    path = run.path / "predictions.csv"
    if not path.is_file():
        return None
    return Predictions(*read_predictions(path, run.classes), read_prediction_crops(path), run.threshold)


def dataset_section(folder: Path, classes: list[str], metrics: dict | None,
                    labels_of: Callable[[str], tuple[str, ...]] | None = None) -> dict:
    """Images per class and split (split.json); files skipped and why (metrics.json). `labels_of` splits a
    multi-label run's label sets, so an image counts under each of its labels."""
    labels_of = labels_of or (lambda label: (label,))
    split = read_json(folder / "split.json")
    if split is None:
        return missing("no split.json in the run folder")
    splits = [name for name in ("train", "val", "test") if split.get(name)]
    counts = [[sum(name in labels_of(label) for label in split["labels"][s]) for s in splits] for name in classes]
    rows = [[name] + row for name, row in zip(classes, counts, strict=True)]
    rows.append(["all classes"] + [len(split[s]) for s in splits])
    skipped = None if metrics is None else metrics.get("skipped_files", [])
    return {"splits": splits, "rows": rows, "layout": split.get("layout"), "seed": split.get("seed"),
            "skipped": None if skipped is None else skipped[:SKIPPED_SHOWN],
            "skipped_total": None if skipped is None else len(skipped)}


def training_section(folder: Path, kept: dict | None) -> dict:
    """Each stage's curves, the kept epoch marked, and in words which weights are the model and why."""
    path = folder / "history.csv"
    history = read_history(path) if path.is_file() else []
    if not history:
        return missing("no training history (history.csv is missing or empty): this run was not trained here")
    stages = [{"title": STAGE_TITLES.get(stage, stage) + (UNDONE if kept and kept["stage"] != stage == "finetune"
                                                          else ""), "uri": uri}
              for stage, uri in stage_curves(history, kept, folder / "curves.png")]
    marked = [{**row, "kept": bool(kept) and (row["stage"], int(row["epoch"])) == (kept["stage"], kept["epoch"])}
              for row in history]
    return {"stages": stages, "history": marked, "kept": kept["reason"] if kept else None}


def evaluation_notes(metrics: dict | None) -> list[str]:
    """What the figures are over and what may flatter them: the split's role, copies of training images, an
    undefined AUC. Lines of text above the metrics table."""
    if metrics is None:
        return []
    notes = [f"evaluated: {metrics['split_note']}"] if metrics.get("split_note") else []
    leaked = metrics.get("leaked_from_train")
    if leaked and leaked["count"]:
        without = "—" if leaked["accuracy_without"] is None else f"{leaked['accuracy_without']:.4f}"
        notes.append(f"{leaked['count']} of {leaked['of']} {metrics['split']} images are byte-identical copies of "
                     f"training images: accuracy with them {leaked['accuracy_with']:.4f}, without them {without}"
                     + (" (left out of the figures here)" if leaked["dropped"] else ""))
    elif leaked is None and metrics.get("leak_check"):
        notes.append(f"copies of training images: {metrics['leak_check']}")
    if metrics.get("auc_note"):
        notes.append(f"ROC AUC {metrics['auc_note']}")
    return notes


def metrics_section(metrics: dict | None, folder: Path | None = None) -> dict:
    """The metrics table and confusion matrix; `folder`: the run folder whose confusion.png (written with
    metrics.json) is the figure."""
    if metrics is None:
        return missing("no metrics.json in the run folder: `transferkit evaluate RUN DATA` writes it")
    classes = metrics["classes"]
    counts = np.asarray(metrics["confusion_matrix"])
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return {
        "summary": [("accuracy", metrics["accuracy"]), *leak_free_row(metrics),
                    ("balanced accuracy", metrics.get("balanced_accuracy")),
                    ("top-5 accuracy", metrics.get("top5_accuracy")), ("ROC AUC", metrics.get("auc")),
                    ("log loss", metrics["loss"]), ("expected calibration error", metrics.get("ece"))],
        "auc": metrics.get("auc"),
        "n": metrics["n"],
        "split": metrics["split"],
        "per_class": metrics["per_class"],
        "confusion_uri": confusion_uri(metrics["confusion_matrix"], classes,
                                       folder / "confusion.png" if folder else None),
        "confusion": list(zip(classes, counts.tolist(), rates.tolist(), strict=True)),
        "confusion_tables": len(classes) <= CONFUSION_TABLE_MAX,
        "classes": classes,
    }


def leak_free_row(metrics: dict) -> list[tuple[str, float | None]]:
    """The figure without copies of training images, beside the one with them (none when there are none)."""
    leaked = metrics.get("leaked_from_train")
    if not leaked or not leaked["count"] or leaked["dropped"]:
        return []
    return [(f"accuracy without the {leaked['count']} copies of training images", leaked["accuracy_without"])]


def roc_section(pred: Predictions | None, classes: list[str]) -> dict:
    """Binary tasks only: the second class (the logit's) is the positive one; the run's operating point (its
    threshold, or the larger probability) is marked on both curves."""
    if pred is None:
        return missing(NO_PREDICTIONS)
    is_positive = pred.y_true == 1
    if is_positive.all() or not is_positive.any():
        return missing("the evaluated images are all of one class: a ROC curve needs both")
    decided = pred.y_pred == 1
    return {"uri": roc_uri(is_positive, pred.probs[:, 1], decided), "positive": classes[1],
            "pr_uri": precision_recall_uri(is_positive, pred.probs[:, 1], decided),
            "threshold": 0.5 if pred.threshold is None else pred.threshold}


def calibration_section(pred: Predictions | None, temperature: float, metrics: dict | None) -> dict:
    """The reliability diagram of the evaluated predictions, and of the same without the run's temperature."""
    if pred is None or not len(pred.paths):
        return missing(NO_PREDICTIONS if pred is None else "predictions.csv lists no images")
    curves = [("calibrated", pred.probs)] if temperature == 1.0 else [
        ("before temperature scaling", rescaled(pred.probs, temperature)), ("calibrated", pred.probs)]
    bins = [(label, *reliability_bins(probs, pred.y_true)[:2]) for label, probs in curves]
    return {"uri": reliability_uri(bins), "temperature": temperature,
            "ece": (metrics or {}).get("ece"), "ece_uncalibrated": (metrics or {}).get("ece_uncalibrated")}


def prediction_sections(run: Run, pred: Predictions | None) -> dict:
    """The sections drawn from per-image predictions; the only ones that run the model (on a few images)."""
    if pred is None or not len(pred.paths):
        message = NO_PREDICTIONS if pred is None else "predictions.csv lists no images"
        return {"gallery": missing(message), "top_losses": missing(message), "similarity": missing(message)}
    return {"gallery": gallery_section(run, pred), "top_losses": top_losses_section(pred, run.classes),
            "similarity": similarity_section(run.explained, pred)}


def leaderboard_section(folder: Path) -> list[dict] | None:
    """`transferkit auto`'s probe of each candidate backbone and the finalists' race (leaderboard.csv), best probe
    first; None for other runs."""
    path = folder / "leaderboard.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        return [{**row, "params": int(row["params"]), "probe_accuracy": float(row["probe_accuracy"]),
                 "sd": float(row["sd"]), "race_val_loss": float(row["race_val_loss"]) if row["race_val_loss"] else None,
                 "chosen": row["chosen"] == "yes"} for row in csv.DictReader(handle)]


def model_section(run: Run) -> dict:
    """What the classifier is (backbone, weights, head, preprocessing) and how it was trained (the config)."""
    meta = run.meta
    config_path = run.path / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else None
    recipe = (yaml.safe_load(config_text) or {}).get("recipe") if config_text else None
    if "ensemble" in meta:
        return {"rows": ensemble_model_rows(meta), "config": config_text, "meta": json.dumps(meta, indent=2)}
    rows = [("backbone", f"{meta['backbone']} (timm {meta['timm_name']})"),
            ("weights", meta["weights_source"]),
            ("recipe", recipe or "—"),
            ("task", f"{meta['task']}, {len(run.classes)} classes"),
            ("input", f"{meta['image_size']} px, {meta['interpolation']}, crop {meta['crop_pct']}"),
            ("normalisation", f"mean {meta['mean']}, std {meta['std']}"),
            ("head", json.dumps(meta["head"])),
            ("created", f"{meta['created']} by transferkit {meta['transferkit_version']}")]
    if meta.get("interrupted"):
        rows.append(("interrupted", "yes: training was stopped early by the user"))
    return {"rows": rows, "config": config_text, "meta": json.dumps(meta, indent=2)}
