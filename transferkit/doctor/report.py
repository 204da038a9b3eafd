"""`diagnose`: scan the data, embed it through the feature cache, run every check, return one JSON-ready report."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from transferkit.cache import cache_root, file_digest
from transferkit.data.sources import DatasetIndex, Sample, scan_dataset
from transferkit.doctor import checks
from transferkit.doctor.mislabel import likely_mislabeled
from transferkit.errors import UserError
from transferkit.features import FeatureExtractor, clean_view
from transferkit.models.pretrained import load_backbone
from transferkit.options import DEFAULT_BACKBONE, ENGINES
from transferkit.progress import Reporter

# Re-encoded, brightened and resized copies score above it, distinct photos far below (decision 0223).
NEAR_THRESHOLD = 0.95
MAX_IMBALANCE = 3.0
MIN_SIDE = 32
# Above this share of images in near-duplicate groups the images are alike as a whole, not copies of each other.
ALIKE_SHARE = 0.2


@dataclass
class DoctorOptions:
    """What doctor embeds with and where it draws its lines; the embedding settings match `train`'s."""

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None  # a local ImageNet weights file, as for train
    image_size: int | None = None  # None: the backbone's input size
    crop_pct: float | None = None  # None: the backbone's
    near_threshold: float = NEAR_THRESHOLD
    max_imbalance: float = MAX_IMBALANCE  # largest / smallest class count above this is flagged
    min_size: int = MIN_SIDE  # pixels; the input size / 4 when that is larger
    val_split: float = 0.2  # as train, so "leakage" is about the split train would make
    test_split: float = 0.0
    seed: int = 0
    batch_size: int = 32
    workers: int = 2
    engine: str = "auto"
    cache: bool = True
    cache_dir: str | None = None
    quiet: bool = False

    def validate(self) -> DoctorOptions:
        rules = [
            (0 < self.near_threshold <= 1, "near threshold must be in (0, 1]"),
            (self.max_imbalance >= 1, "max imbalance must be at least 1"),
            (self.min_size >= 1, "min size must be at least 1 pixel"),
            (self.image_size is None or self.image_size >= 16, "image size must be at least 16 pixels"),
            (self.crop_pct is None or 0.2 <= self.crop_pct <= 1.0, "crop_pct must be between 0.2 and 1"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.workers >= 0, "workers must be 0 or more"),
            (self.engine in ENGINES, f"engine must be one of {', '.join(ENGINES)}"),
        ]
        for ok, message in rules:
            if not ok:
                raise UserError(f"bad doctor option: {message}")
        return self


def diagnose(data: str | os.PathLike[str], options: DoctorOptions | None = None) -> dict:
    """Every check on one dataset. Findings are data, not errors: only unusable input raises (UserError)."""
    options = (options or DoctorOptions()).validate()
    reporter = Reporter(options.quiet)
    index = scan_dataset(data, options.val_split, options.test_split, options.seed, trainable=False)
    vectors, backbone = embed(index.samples, options, reporter)
    contents = checks.group_by_content([file_digest(s.path) for s in index.samples])
    exact = checks.exact_duplicates(index.samples, contents)
    near = checks.near_duplicates(index.samples, contents, vectors, options.near_threshold)
    min_side = max(options.min_size, backbone["image_size"] // 4)
    mislabeled, notes = likely_mislabeled(index.samples, vectors, options.seed)
    report = {
        "data": index.root,
        "layout": index.layout,
        "images": len(index.samples),
        "classes": index.classes,
        "backbone": backbone,
        "settings": {"near_threshold": options.near_threshold, "max_imbalance": options.max_imbalance,
                     "min_side": min_side, "val_split": options.val_split, "test_split": options.test_split,
                     "seed": options.seed},
        "skipped": checks.skipped_files(index.skipped),
        "exact_duplicates": exact,
        "near_duplicates": near,
        "leakage": checks.leakage(exact, near),
        "class_balance": checks.class_balance(index.samples, index.classes, options.max_imbalance),
        "tiny_images": checks.tiny_images(index.samples, min_side),
        "mislabeled": mislabeled,
        "notes": notes + _alike_note(near, len(index.samples), options.near_threshold) + _split_note(index, options),
    }
    report["summary"] = summarize(report)
    return report


def summarize(report: dict) -> dict:
    """How many findings of each kind; `findings` is their total (0: nothing to fix)."""
    counts = {key: len(report[key]) for key in
              ("skipped", "exact_duplicates", "near_duplicates", "leakage", "tiny_images", "mislabeled")}
    counts["class_imbalance"] = int(report["class_balance"]["flagged"])
    return {**counts, "findings": sum(counts.values())}


def embed(samples: list[Sample], options: DoctorOptions, reporter: Reporter) -> tuple[np.ndarray, dict]:
    """Clean-view backbone features of every sample, through the same cache key as train's frozen stage (view 0),
    so doctor then train on the same data and settings runs the backbone once."""
    backbone = load_backbone(options.backbone, options.weights, options.image_size, options.crop_pct)
    extract = FeatureExtractor(backbone.model, options.engine, options.batch_size, options.workers, reporter,
                               cache_root(options.cache, options.cache_dir))
    [features] = extract([s.path for s in samples], [clean_view(backbone.pre)], "features")
    reporter.log(f"features: {extract.computed} images through the backbone, the other "
                 f"{len(samples) - extract.computed} from the cache")
    return features.numpy(), {"name": backbone.spec.name, "weights": backbone.weights_source,
                              "image_size": backbone.pre.image_size}


def _alike_note(near: list[dict], n_images: int, threshold: float) -> list[str]:
    in_groups = sum(len(group["files"]) for group in near)
    if in_groups <= ALIKE_SHARE * n_images:
        return []
    return [f"{in_groups} of {n_images} images are in near-duplicate groups: the images look alike as a whole "
            f"(one kind of object or scene), so cosine {threshold} also joins distinct ones; raise --near-threshold "
            "(e.g. 0.99) to keep only copies"]


def _split_note(index: DatasetIndex, options: DoctorOptions) -> list[str]:
    if index.layout == "splits" and index.split("val"):
        return []  # the folders fix the split
    return [f"where the data names no split, leakage is checked against the one train makes with --val-split "
            f"{options.val_split} --test-split {options.test_split} --seed {options.seed}"]
