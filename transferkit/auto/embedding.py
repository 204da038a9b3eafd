"""A candidate backbone loaded as `api.train` loads it, and the clean-view features of images through the feature
cache under the same key as train's frozen stage: probing a backbone and then training it runs it once per image."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence

import numpy as np

from transferkit.cache import cache_root
from transferkit.config import TrainConfig
from transferkit.data.boxes import crop_regions
from transferkit.data.images import pixel_size
from transferkit.data.sources import Sample
from transferkit.features import FeatureExtractor, clean_view
from transferkit.models.pretrained import Backbone, load_backbone
from transferkit.progress import Reporter
from transferkit.training.compute import resolve_device

# The most a backbone's input is enlarged beyond its pretrained size: 1.5x is 2.25x the compute per image.
MAX_UPSCALE = 1.5


def load_candidate(name: str, weights: str | None, config: TrainConfig) -> Backbone:
    """A candidate backbone with the config's image size and crop, on the config's device."""
    backbone = load_backbone(name, weights, config.image_size, config.crop_pct)
    backbone.model.to(resolve_device(config.device))
    return backbone


def enlarged(backbone: Backbone, native_side: float, config: TrainConfig) -> Backbone:
    """The same network fed images nearer their own size (`input_size`), unless the config sets the size."""
    if config.image_size is not None:
        return backbone
    size = input_size(backbone.pre.image_size, native_side, backbone.pre.crop_pct)
    return dataclasses.replace(backbone, pre=dataclasses.replace(backbone.pre, image_size=size))


def input_size(pretrained: int, native_side: float, crop_pct: float) -> int:
    """The pretrained input size, or more when the images are larger: the image's own short side (after the
    centre crop), at most MAX_UPSCALE times the pretrained size. Networks trained at 224 px do better when tested
    and fine-tuned at a larger size (Touvron et al. 2019, FixRes), and small defects and parts survive a gentler
    downscale: on ELPV's 300 px cells, Lite0 at 300 px reached a lower validation loss than at 224 (0.270 vs 0.276)."""
    return max(pretrained, min(int(native_side * crop_pct), int(MAX_UPSCALE * pretrained)))


def median_short_side(samples: Sequence[Sample], margin: float) -> float:
    """The median of the images' shorter sides in pixels (of the box with its margin, for a boxed sample), read
    from the file headers."""
    sides = []
    for sample in samples:
        if sample.box:
            box = sample.box.with_margin(margin)
            sides.append(min(box.x2 - box.x1, box.y2 - box.y1))
        else:
            sides.append(min(pixel_size(sample.path)))
    return statistics.median(sides)


def clean_features(backbone: Backbone, samples: Sequence[Sample], config: TrainConfig,
                   reporter: Reporter) -> np.ndarray:
    """(N, D) float32 features of the clean (un-augmented) view of each sample's image (cropped to its box, with
    the config's margin, as training crops it), from the cache where present."""
    view = clean_view(backbone.pre, config.augmentation().samplewise_center)
    extract = FeatureExtractor(backbone.model, config.feature_engine, config.batch_size, config.workers, reporter,
                               cache_root(config.cache, config.cache_dir))
    crops = crop_regions([s.box for s in samples], config.box_margin)
    [table] = extract.tables([s.path for s in samples], [view], f"features {backbone.spec.name}", crops)
    return table.take(np.arange(len(table)))
