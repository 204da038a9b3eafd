"""A candidate backbone loaded as `api.train` loads it, and the clean-view features of images through the feature
cache under the same key as train's frozen stage: probing a backbone and then training it runs it once per image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from transferkit.config import TrainConfig
from transferkit.data.boxes import crop_regions
from transferkit.data.sources import Sample
from transferkit.features.cache import cache_root
from transferkit.features.extract import FeatureExtractor, View, clean_view
from transferkit.models.device import resolve_device
from transferkit.models.pretrained import Backbone, load_backbone
from transferkit.progress import Reporter


def load_candidate(name: str, weights: str | None, config: TrainConfig) -> Backbone:
    """A candidate backbone with the config's image size and crop, on the config's device."""
    backbone = load_backbone(name, weights, config.image_size, config.crop_pct, config.pool)
    backbone.model.to(resolve_device(config.device))
    return backbone


def clean_features(backbone: Backbone, samples: Sequence[Sample], config: TrainConfig,
                   reporter: Reporter) -> np.ndarray:
    """(N, D) float32 features of the clean (un-augmented) view of each sample's image (cropped to its box, with
    the config's margin, as training crops it), from the cache where present."""
    [features] = view_features(backbone, samples, config, reporter,
                               [clean_view(backbone.pre, config.augmentation().samplewise_center)], "features")
    return features


def view_features(backbone: Backbone, samples: Sequence[Sample], config: TrainConfig, reporter: Reporter,
                  views: Sequence[View], what: str) -> list[np.ndarray]:
    """(N, D) float32 features of each sample under each view, through the feature cache."""
    extract = FeatureExtractor(backbone.model, config.feature_engine, config.batch_size, config.workers, reporter,
                               cache_root(config.cache, config.cache_dir))
    crops = crop_regions([s.box for s in samples], config.box_margin)
    tables = extract.tables([s.path for s in samples], list(views), f"{what} {backbone.spec.name}", crops)
    return [table.take(np.arange(len(table))) for table in tables]
