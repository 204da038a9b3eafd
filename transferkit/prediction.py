"""What to predict and how a prediction is reported, without PyTorch: image files, folders, dataset CSVs and packed
datasets in; `predict --json` records out, from a Run or an export alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from transferkit.data import remote
from transferkit.data.boxes import Box, crop_regions
from transferkit.data.members import looks_packed
from transferkit.data.sources import Skipped, image_problems, list_image_files, scan_dataset
from transferkit.errors import UserError
from transferkit.task import multilabel
from transferkit.task.calibration import decide

ENSEMBLE = "ensemble"  # the meta.json key of an ensemble run folder (docs/design.md, decision 0275)


def ensemble_members(folder: Path) -> list[tuple[Path, float]] | None:
    """An ensemble run folder's members (each a complete run folder) with their weights, which sum to 1; None for
    a single run (or a folder without a readable meta.json, which the caller reports as it does for any run)."""
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    spec = meta.get(ENSEMBLE) if isinstance(meta, dict) else None
    if spec is None:
        return None
    total = sum(float(member["weight"]) for member in spec["members"])
    return [(Path(folder) / member["path"], float(member["weight"]) / total) for member in spec["members"]]


def averaged(probabilities: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """The ensemble's probabilities: its members' (each calibrated by its own temperature), weighted."""
    return sum(w * np.asarray(p, dtype=np.float64) for p, w in zip(probabilities, weights, strict=True)).astype(
        np.float32)


class Predictor(Protocol):
    """A Run or an OnnxPredictor: what prediction needs of either."""

    classes: list[str]
    box_margin: float
    thresholds: np.ndarray | None
    threshold: float | None

    def probabilities(self, paths: list[str], crops: list[Box | None] | None = None) -> np.ndarray: ...


def top_predictions(paths: list[str], probs: np.ndarray, names: list[str], top_k: int,
                    threshold: float | None = None) -> list[dict]:
    """The `predict --json` shape: path, label, probability and the top-k labels with probabilities. The label is
    the decided class: a binary run's `threshold` can pick the less probable one."""
    results = []
    probs = np.asarray(probs)
    for path, p, chosen in zip(paths, probs, decide(probs, threshold), strict=True):
        order = np.argsort(-p)[: max(1, top_k)]
        results.append(
            {
                "path": path,
                "label": names[chosen],
                "probability": float(p[chosen]),
                "top": [{"label": names[i], "probability": float(p[i])} for i in order],
            }
        )
    return results


def collect_inputs(inputs: list[str]) -> tuple[list[str], list[Box | None] | None, list[Skipped]]:
    """Like collect_images, plus dataset CSVs and packed datasets (`transferkit pack`): their images with their boxes
    (None where no input has any)."""
    tables = [item for item in inputs if (item.lower().endswith(".csv") and Path(item).is_file())
              or (Path(item).is_dir() and looks_packed(item)) or remote.is_url(item)]
    images = [item for item in inputs if item not in tables]
    paths, skipped = collect_images(images) if images else ([], [])
    boxes: list[Box | None] = [None] * len(paths)
    for table in tables:
        index = scan_dataset(table, trainable=False)  # labels are not needed to predict, nor enough of them to train
        paths += [s.path for s in index.samples]
        boxes += [s.box for s in index.samples]
        skipped += index.skipped
    return paths, boxes if any(boxes) else None, skipped


def prediction_records(predictor: Predictor, paths: list[str], boxes: list[Box | None] | None,
                       top_k: int) -> list[dict]:
    """`predict --json` records from a Run or an export: top-k classes, or a multi-label run's labels above their
    thresholds; an image cropped to a box says which."""
    probs = predictor.probabilities(paths, crop_regions(boxes, predictor.box_margin) if boxes else None)
    if predictor.thresholds is not None:
        records = multilabel.predictions(paths, probs, predictor.classes, predictor.thresholds)
    else:
        records = top_predictions(paths, probs, predictor.classes, top_k, predictor.threshold)
    for record, box in zip(records, boxes or [], strict=False):
        if box:
            record["box"] = box.to_list()
    return records


def collect_images(inputs: list[str]) -> tuple[list[str], list[Skipped]]:
    """Files and folders (recursively) -> readable image paths in a stable order, plus what was skipped and why."""
    candidates, skipped = [], []
    for item in inputs:
        target = Path(item)
        if not target.exists():
            raise UserError(f"no such file or folder: {item}")
        found, passed_over = list_image_files(target.resolve()) if target.is_dir() else ([str(target.resolve())], [])
        candidates += found
        skipped += passed_over
    problems = image_problems(candidates)
    paths = [path for path, problem in zip(candidates, problems, strict=True) if problem is None]
    skipped += [Skipped(path, problem) for path, problem in zip(candidates, problems, strict=True) if problem]
    if not paths:
        detail = f": {skipped[0].path}: {skipped[0].reason}" if skipped else ""
        raise UserError(f"no readable images in {' '.join(inputs)}{detail}")
    return paths, skipped
