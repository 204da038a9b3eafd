"""`diagnose`: scan the data, embed it through the feature cache, run every check, return one JSON-ready report."""

from __future__ import annotations

import os

import numpy as np

from transferkit.data.content import file_digest, group_by_content
from transferkit.data.sources import DatasetIndex, Sample, scan_dataset
from transferkit.doctor import checks
from transferkit.doctor.mislabel import likely_mislabeled
from transferkit.doctor.options import ALIKE_SHARE, DoctorOptions
from transferkit.doctor.quality import image_issues
from transferkit.features.cache import cache_root
from transferkit.features.extract import FeatureExtractor, clean_view
from transferkit.models.pretrained import load_backbone
from transferkit.progress import Reporter


def diagnose(data: str | os.PathLike[str], options: DoctorOptions | None = None) -> dict:
    """Every check on one dataset. Findings are data, not errors: only unusable input raises (UserError)."""
    options = (options or DoctorOptions()).validate()
    reporter = Reporter(options.quiet)
    index = scan_dataset(data, options.val_split, options.test_split, options.seed, trainable=False)
    vectors, backbone = embed(index.samples, options, reporter)
    contents = group_by_content([file_digest(s.path) for s in index.samples])
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
        "image_issues": image_issues(index.samples, options.workers),
        "mislabeled": mislabeled,
        "notes": notes + _alike_note(near, len(index.samples), options.near_threshold) + _split_note(index, options)
        + checks.ignored_note(index.skipped),
    }
    report["summary"] = summarize(report)
    return report


def summarize(report: dict) -> dict:
    """How many findings of each kind; `findings` is their total (0: nothing to fix)."""
    counts = {key: len(report[key]) for key in
              ("skipped", "exact_duplicates", "near_duplicates", "leakage", "tiny_images", "image_issues",
                          "mislabeled")}
    counts["class_imbalance"] = int(report["class_balance"]["flagged"])
    return {**counts, "findings": sum(counts.values())}


def embed(samples: list[Sample], options: DoctorOptions, reporter: Reporter) -> tuple[np.ndarray, dict]:
    """Clean-view backbone features of every sample, pooled as `train`'s (doctor's thresholds hold for either
    pooling, decisions 0223 and 0302), through the feature cache: `train` on the same data and settings reads them."""
    backbone = load_backbone(options.backbone, options.weights, options.image_size, options.crop_pct, options.pool)
    extract = FeatureExtractor(backbone.model, options.engine, options.batch_size, options.workers, reporter,
                               cache_root(options.cache, options.cache_dir))
    [features] = extract([s.path for s in samples], [clean_view(backbone.pre)], "features")
    reporter.log(f"features: {extract.computed} images through the backbone, the other "
                 f"{len(samples) - extract.computed} from the cache")
    return features.numpy(), {"name": backbone.spec.name, "weights": backbone.weights_source,
                              "image_size": backbone.pre.image_size, "pool": backbone.model.global_pool}


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
