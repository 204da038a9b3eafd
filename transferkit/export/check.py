"""What an export is checked on before it is written: the run's validation images as the network's pixels (cropped
to their boxes, as in training) and their labels (class indices, or a multi-label run's multi-hot rows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2 as T

from transferkit.data.boxes import Box, crop_regions
from transferkit.data.images import image_file_exists, load_image
from transferkit.data.labelsets import label_set
from transferkit.data.loader import targets_of
from transferkit.data.transforms import Preprocess, eval_transform
from transferkit.runs.run import Run

FEW_IMAGES = 8  # below this the check proves little, and the user is told so
CHECK_IMAGES = 512  # held in memory as pixels (~300 MB at 224 px); enough to see a 1% disagreement


def pixel_transform(pre: Preprocess) -> T.Compose:
    """eval_transform minus Normalize (the graph normalises): exactly the pixels the run was evaluated on."""
    return T.Compose([step for step in eval_transform(pre).transforms if not isinstance(step, T.Normalize)])


def validation_images(run: Run) -> tuple[torch.Tensor, np.ndarray | None, list[str]]:
    """The run's validation images as [0, 1] pixels, their labels when known, and notes for the user.

    Labels come from split.json's "labels" (lists parallel to the splits' paths) when it records them, else from
    the parent folder's name (folder layouts); boxes from its "boxes", with the run's margin."""
    split_path = run.path / "split.json"
    split = json.loads(split_path.read_text()) if split_path.is_file() else {}
    listed = split.get("val", [])
    given = split.get("labels", {}).get("val") or [Path(p).parent.name for p in listed]
    boxes = split.get("boxes", {}).get("val") or [None] * len(listed)
    found = [row for row in zip(listed, given, boxes, strict=True) if image_file_exists(row[0])]
    missing = len(listed) - len(found)
    notes = [f"{missing} validation images listed in split.json are missing"] if missing else []
    if len(found) > CHECK_IMAGES:  # evenly spaced, so every class (split.json lists them in order) is represented
        notes.append(f"checking on {CHECK_IMAGES} of the {len(found)} validation images")
        found = [found[i] for i in np.linspace(0, len(found) - 1, CHECK_IMAGES).round().astype(int)]
    if len(found) < FEW_IMAGES:
        notes.append(f"only {len(found)} validation images found: the parity check on them proves little")
    paths, names = [p for p, _, _ in found], [label for _, label, _ in found]
    regions = crop_regions([box and Box(*box) for _, _, box in found], run.box_margin) or [None] * len(found)
    transform = pixel_transform(run.preprocess)
    images = [transform(load_image(p, r, run.preprocess.resize_size)) for p, r in zip(paths, regions, strict=True)]
    pixels = torch.stack(images) if images else torch.zeros(0)
    labels = known_labels(run, names)
    if paths and labels is None:
        notes.append("validation labels unknown (not in split.json nor folder names): accuracy not compared")
    return pixels, labels, notes


def known_labels(run: Run, names: list[str]) -> np.ndarray | None:
    """Class indices (multi-label: multi-hot rows) of the names, or None when some name is not the run's."""
    sets = [label_set(name) if run.multilabel else (name,) for name in names]
    if not names or not {label for labels in sets for label in labels} <= set(run.classes):
        return None
    if not run.multilabel:
        return np.array([run.classes.index(name) for name in names])
    return targets_of(names, label_set, run.classes, multi_hot=True).numpy()
