"""A pretrained backbone ready to extract features, with the preprocessing training would use for it."""

from __future__ import annotations

from dataclasses import dataclass

from transferkit.data.transforms import Preprocess
from transferkit.models.classifier import Classifier, HeadSpec, new_classifier
from transferkit.models.registry import BackboneSpec, create_imagenet_model, get_backbone


@dataclass
class Backbone:
    spec: BackboneSpec
    weights_source: str
    model: Classifier  # the pretrained network without its ImageNet top; the head is a placeholder
    pre: Preprocess


def load_backbone(name: str, weights: str | None, image_size: int | None = None,
                  crop_pct: float | None = None, pool: str = "auto") -> Backbone:
    """The ImageNet backbone, pooled as `pool` says, and its preprocessing (image size and crop overridden where
    given), as api.train builds them, so that the feature-cache keys agree with training's."""
    spec = get_backbone(name)
    imagenet_model, weights_source = create_imagenet_model(spec, weights)
    pre = Preprocess.for_model(imagenet_model, image_size, crop_pct)
    # the head is never used: the classifier wrapper gives FeatureExtractor its `embed` and the cache its backbone
    return Backbone(spec, weights_source, new_classifier(imagenet_model, 1, HeadSpec(), pool=pool), pre)
