"""The learning-rate range test on a dataset or on a run's training split (`transferkit lr-find`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.auto.embedding import clean_features, load_candidate
from transferkit.auto.range_test import LRFind, lr_find
from transferkit.config import TrainConfig, resolve_config
from transferkit.data.boxes import Box
from transferkit.data.sources import DatasetIndex, Sample, scan_dataset
from transferkit.errors import UserError
from transferkit.progress import Reporter

SINGLE_LABEL_ONLY = "auto and lr-find handle single-label data (one class per image); use `transferkit train`"


def lr_find_data(source: str | Path, *, quiet: bool = False, recipe: str | None = None, config: str | None = None,
                 **options: Any) -> LRFind:
    """The range test on the clean-view features of a training split: DATA's (split as `train` would split it),
    or a run's, given its config.yaml (the run's settings, and its training images as split.json lists them)."""
    run_config = Path(source) if str(source).endswith((".yaml", ".yml")) else None
    if run_config and config:
        raise UserError("give a run's config.yaml or --config, not both")
    cfg = resolve_config(recipe, str(run_config) if run_config else config, **options)
    samples, classes = run_training_samples(run_config) if run_config else data_training_samples(source, cfg)
    backbone = load_candidate(cfg.backbone, cfg.weights, cfg)
    features = clean_features(backbone, samples, cfg, Reporter(quiet))
    return lr_find(features, np.array([classes.index(s.label) for s in samples]), len(classes), cfg)


def data_training_samples(data: str | Path, cfg: TrainConfig) -> tuple[list[Sample], list[str]]:
    index = single_label(scan_dataset(data, cfg.val_split, cfg.test_split, cfg.seed))
    return index.split("train"), index.classes


def run_training_samples(run_config: Path) -> tuple[list[Sample], list[str]]:
    """The training images (and boxes) a run's split.json lists, with the classes of its meta.json."""
    split_path, meta_path = run_config.parent / "split.json", run_config.parent / "meta.json"
    if not (split_path.is_file() and meta_path.is_file()):
        raise UserError(f"{run_config} is not in a run folder (split.json and meta.json beside it): give DATA instead")
    split, meta = json.loads(split_path.read_text()), json.loads(meta_path.read_text())
    if meta["task"] not in ("binary", "multiclass"):
        raise UserError(SINGLE_LABEL_ONLY)
    boxes = split.get("boxes", {}).get("train") or [None] * len(split["train"])
    samples = [Sample(path, label, "train", Box(*box) if box else None)
               for path, label, box in zip(split["train"], split["labels"]["train"], boxes, strict=True)]
    return samples, meta["classes"]


def single_label(index: DatasetIndex) -> DatasetIndex:
    if index.multilabel:
        raise UserError(SINGLE_LABEL_ONLY)
    return index
