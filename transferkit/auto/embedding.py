"""A candidate backbone loaded as `api.train` loads it, and the clean-view features of images through the feature
cache under the same key as train's frozen stage: probing a backbone and then training it runs it once per image."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.cache import default_cache_dir
from transferkit.config import TrainConfig
from transferkit.data.boxes import crop_regions
from transferkit.data.sources import Sample
from transferkit.data.transforms import Preprocess, eval_transform
from transferkit.features import FeatureExtractor, View
from transferkit.models.classifier import Classifier, HeadSpec, new_classifier
from transferkit.models.registry import BackboneSpec, create_imagenet_model, get_backbone
from transferkit.progress import Reporter
from transferkit.training.compute import resolve_device


@dataclass
class Backbone:
    spec: BackboneSpec
    weights_source: str
    model: Classifier  # the pretrained network without its ImageNet top; the head is a placeholder
    pre: Preprocess


def load_backbone(name: str, weights: str | None, config: TrainConfig) -> Backbone:
    """The pretrained backbone and its preprocessing, with the config's image size and crop, as api.train builds
    them (so the cache keys agree)."""
    spec = get_backbone(name)
    imagenet_model, weights_source = create_imagenet_model(spec, weights)
    pre = Preprocess.from_timm_config(imagenet_model.pretrained_cfg)
    pre = dataclasses.replace(pre, image_size=config.image_size or pre.image_size,
                              crop_pct=config.crop_pct or pre.crop_pct)
    # the head is never used: the classifier wrapper gives FeatureExtractor its `embed` and the cache its backbone
    model = new_classifier(imagenet_model, 2, HeadSpec(), binary_logit=True)
    return Backbone(spec, weights_source, model.to(resolve_device(config.device)), pre)


def clean_features(backbone: Backbone, samples: Sequence[Sample], config: TrainConfig,
                   reporter: Reporter) -> np.ndarray:
    """(N, D) float32 features of the clean (un-augmented) view of each sample's image (cropped to its box, with
    the config's margin, as training crops it), from the cache where present."""
    augment = config.augmentation()
    # Keyed exactly as two_stage.frozen_stage keys its view 0, so training reads these rows instead of recomputing.
    spec = {"preprocess": backbone.pre.to_dict(), "samplewise_center": augment.samplewise_center, "view": 0}
    view = View(0, eval_transform(backbone.pre, augment.samplewise_center), spec)
    cache_root = None if not config.cache else Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    extract = FeatureExtractor(backbone.model, config.feature_engine, config.batch_size, config.workers, reporter,
                               cache_root)
    crops = crop_regions([s.box for s in samples], config.box_margin)
    [table] = extract.tables([s.path for s in samples], [view], f"features {backbone.spec.name}", crops)
    return table.take(np.arange(len(table)))
