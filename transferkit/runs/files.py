"""What a run folder holds on disk, written and read back: meta.json, the weights, history.csv and
predictions.csv (the contract is in docs/design.md)."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import transferkit
from transferkit.config import TrainConfig
from transferkit.data.boxes import Box
from transferkit.data.transforms import Preprocess
from transferkit.errors import UserError
from transferkit.fileio import atomic_path, atomic_write
from transferkit.models.registry import BackboneSpec
from transferkit.task.kinds import Task

FORMAT_VERSION = 1


def write_json(path: Path, value: object) -> None:
    atomic_write(path, json.dumps(value, indent=2) + "\n")


def save_weights(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def build_meta(cfg: TrainConfig, backbone: BackboneSpec, weights_source: str, task: Task, pre: Preprocess,
               interrupted: bool) -> dict:
    """meta.json's model entries: enough to rebuild the classifier with no training data or pretrained weights."""
    return {
        "format_version": FORMAT_VERSION,
        "backbone": backbone.name,
        "timm_name": backbone.timm_name,
        "weights_source": weights_source,
        **task.meta(),
        **pre.to_dict(),
        "samplewise_center": cfg.augmentation().samplewise_center,
        "head": cfg.head_spec().to_dict(),
        # so `evaluate RUN DATA` on the same data re-creates the same split
        "data_split": {"val_split": cfg.val_split, "test_split": cfg.test_split, "seed": cfg.seed},
        "interrupted": interrupted,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "transferkit_version": transferkit.__version__,
    }


def read_history(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return [{k: (v if k == "stage" else float(v)) for k, v in row.items()} for row in csv.DictReader(handle)]


def write_predictions(path: Path, paths: list[str], truths: list[str], predicted: list[str], probs: np.ndarray,
                      classes: list[str], crops: list[Box | None] | None = None) -> None:
    """predictions.csv: one row per evaluated image (path, true and predicted label, [the region cropped,] each
    class's probability), so the report can draw ROC curves and pick images without running the model over the
    split again."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", "predicted"] + (["crop"] if crops else []) + [f"p:{name}" for name in classes])
    for i, (file, truth, guess, p) in enumerate(zip(paths, truths, predicted, probs, strict=True)):
        region = [" ".join(map(repr, crops[i].to_list())) if crops[i] else ""] if crops else []
        writer.writerow([file, truth, guess] + region + [f"{v:.6g}" for v in p])
    atomic_write(path, buffer.getvalue())


def read_predictions(path: Path, classes: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """predictions.csv back as (paths, true class indices, (N, classes) probabilities)."""
    with path.open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    first = header.index("crop") + 1 if "crop" in header else 3
    if header[first:] != [f"p:{name}" for name in classes]:
        raise UserError(f"{path} does not list this run's classes; run `transferkit evaluate` again")
    labels = [classes.index(row[1]) for row in rows]
    probs = np.array([[float(v) for v in row[first:]] for row in rows], dtype=np.float64)
    return [row[0] for row in rows], np.array(labels, dtype=int), probs.reshape(len(rows), len(classes))


def read_prediction_crops(path: Path) -> list[Box | None] | None:
    """The region each image of predictions.csv was cropped to, or None when the evaluated data had no boxes."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "crop" not in rows[0]:
        return None
    return [Box(*map(float, row["crop"].split())) if row["crop"] else None for row in rows]


