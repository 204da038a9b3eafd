"""The transfer-learning classifier: a timm backbone without its top, global pooling, and a new head."""

from __future__ import annotations

import timm
import torch
from torch import nn

from transferkit.errors import UserError
from transferkit.options import HeadSpec


def build_head(in_features: int, num_outputs: int, spec: HeadSpec) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Dropout(spec.dropout)] if spec.dropout else []
    width = in_features
    for units in spec.hidden:
        layers += [nn.Linear(width, units), nn.ReLU(inplace=True)]
        if spec.batchnorm:
            layers.append(nn.BatchNorm1d(units))
        width = units
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def num_outputs(num_classes: int, binary_logit: bool) -> int:
    """Two classes get one logit (BCE, logit < 0 means the first class) unless a 2-way softmax is asked for."""
    return 1 if num_classes == 2 and binary_logit else num_classes


class Classifier(nn.Module):
    """`embed` gives the pooled backbone features; `forward` the class logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(images)
        return self.backbone.forward_head(features, pre_logits=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


def new_classifier(imagenet_model: nn.Module, num_classes: int, head_spec: HeadSpec, binary_logit: bool) -> Classifier:
    """Drop the ImageNet top (timm's reset_classifier keeps the global pool) and attach a fresh head."""
    imagenet_model.reset_classifier(0)
    head = build_head(int(imagenet_model.num_features), num_outputs(num_classes, binary_logit), head_spec)
    return Classifier(imagenet_model, head)


def empty_classifier(timm_name: str, num_outputs_: int, head_spec: HeadSpec) -> Classifier:
    """The architecture alone, for loading a saved run: no ImageNet weights are needed to predict."""
    backbone = timm.create_model(timm_name, pretrained=False, num_classes=0)
    return Classifier(backbone, build_head(int(backbone.num_features), num_outputs_, head_spec))


def backbone_groups(backbone: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters in coarse blocks from stem to top (timm's group_matcher: stem, stages, head)."""
    from timm.models import group_parameters

    names = group_parameters(backbone, backbone.group_matcher(coarse=True))
    params = dict(backbone.named_parameters())
    return [[params[n] for n in group] for group in names.values() if group]


def freeze_backbone(model: Classifier) -> None:
    """Stage 1: nothing in the backbone learns, and batch-norm uses its ImageNet statistics."""
    model.backbone.requires_grad_(False)


def unfreeze(model: Classifier, blocks: str | int) -> list[nn.Parameter]:
    """Stage 2: unfreeze all, or the last N coarse blocks; returns the backbone parameters now trainable."""
    groups = backbone_groups(model.backbone)
    if blocks == "all":
        chosen = groups
    else:
        n = int(blocks)
        if n < 0 or n > len(groups):
            raise UserError(f"--unfreeze {n}: this backbone has {len(groups)} blocks; use 0..{len(groups)} or 'all'")
        chosen = groups[len(groups) - n :] if n else []
    params = [p for group in chosen for p in group]
    for p in params:
        p.requires_grad_(True)
    return params


def set_train_mode(model: Classifier, train_backbone_bn: bool) -> None:
    """Head in train mode; backbone batch-norm stays in inference mode unless asked, and always in frozen blocks
    (the Keras advice for fine-tuning on small data: re-estimating BN statistics from tiny batches destroys them)."""
    model.train()
    for module in model.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            trainable = any(p.requires_grad for p in module.parameters())
            module.train(train_backbone_bn and trainable)
