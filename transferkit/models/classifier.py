"""The transfer-learning classifier: a timm backbone without its top, global pooling, and a new head."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import timm
import torch
from timm.layers import SelectAdaptivePool2d
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


class Classifier(nn.Module):
    """`embed` gives the pooled backbone features; `forward` the class logits.

    With `depths` (multi-depth features, Head2Toe-style) the features are the pooled outputs of those
    intermediate levels (timm's `forward_intermediates` indices) followed by the usual pooled last-layer features:
    every consumer (feature cache, predict, export, serve, embeddings) goes through `embed`, so all compute them.
    `global_pool` is how every map is pooled: "avg", "max", or None (a backbone that pools its own way: averaged
    intermediate maps)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, depths: Sequence[int] = (),
                 global_pool: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.depths = tuple(int(d) for d in depths)
        self.global_pool = global_pool

    @property
    def num_features(self) -> int:
        return embed_width(self.backbone, self.depths)

    def maps(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last feature map, and the intermediate maps of `depths` (none without them)."""
        if not self.depths:
            return self.backbone.forward_features(images), []
        final, intermediates = self.backbone.forward_intermediates(images, indices=list(self.depths))
        return final, list(intermediates)

    def pool(self, final: torch.Tensor, intermediates: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = self.backbone.forward_head(final, pre_logits=True)
        if not intermediates:
            return pooled
        pool = torch.amax if self.global_pool == "max" else torch.mean
        return torch.cat([pool(m, dim=(2, 3)) for m in intermediates] + [pooled], dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(*self.maps(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


def depth_levels(backbone: nn.Module) -> tuple[int, ...]:
    """Every intermediate level multi-depth features can come from (timm's feature_info, stem to top)."""
    info = getattr(backbone, "feature_info", None)
    if not hasattr(backbone, "forward_intermediates") or not info:
        raise UserError(f"multi-depth features need a timm backbone with forward_intermediates; "
                        f"{type(backbone).__name__} has none: use feature_depths: last")
    return tuple(range(len(info)))


def embed_width(backbone: nn.Module, depths: Sequence[int]) -> int:
    """How many features `embed` gives: the channels of each chosen level, then the pooled last layer's."""
    return sum(int(backbone.feature_info[d]["num_chs"]) for d in depths) + int(backbone.num_features)


def depth_columns(backbone: nn.Module, computed: Sequence[int], chosen: Sequence[int]) -> np.ndarray:
    """Which columns of features computed with `computed` depths are the features with `chosen` depths (a subset),
    so one extraction at every level serves every choice."""
    starts, offset = {}, 0
    for d in computed:
        starts[d], offset = offset, offset + int(backbone.feature_info[d]["num_chs"])
    parts = [np.arange(starts[d], starts[d] + int(backbone.feature_info[d]["num_chs"])) for d in chosen]
    return np.concatenate(parts + [np.arange(offset, offset + int(backbone.num_features))])


def set_depths(model: Classifier, depths: Sequence[int]) -> None:
    """Give the classifier other feature depths, its head's first layer resized to their width (fresh weights):
    what stage 1 chose on validation, or what a resumed run had chosen before its checkpoint."""
    model.depths = tuple(depths)
    index, first = next((i, m) for i, m in enumerate(model.head) if isinstance(m, nn.Linear))
    model.head[index] = nn.Linear(embed_width(model.backbone, depths), first.out_features).to(first.weight.device)


def drop_top(backbone: nn.Module, pool: str | None) -> str | None:
    """Drop the ImageNet top (timm's reset_classifier) and set how the last feature map is pooled: `pool` "avg" or
    "max", auto (max for a CNN, decision 0298), or None (as the backbone pools: a run from before the choice).
    Only a timm CNN's adaptive pool can be changed. Returns the pooling in use: "avg" or "max", or None where the
    backbone keeps its own."""
    adaptive = isinstance(getattr(backbone, "global_pool", None), SelectAdaptivePool2d)
    if pool is None or (pool == "auto" and not adaptive):
        backbone.reset_classifier(0)
        return backbone.global_pool.pool_type if adaptive else None
    if not adaptive:
        raise UserError(f"pool {pool}: {type(backbone).__name__} does not pool a feature map through timm's "
                        "global_pool: use pool auto")
    chosen = "max" if pool == "auto" else pool
    backbone.reset_classifier(0, global_pool=chosen)
    return chosen


def new_classifier(imagenet_model: nn.Module, outputs: int, head_spec: HeadSpec, depths: Sequence[int] = (),
                   pool: str | None = "auto") -> Classifier:
    """The ImageNet model without its top, pooled as `pool` says (`drop_top`), with a fresh head of `outputs` logits
    (the task's: one for a binary task)."""
    global_pool = drop_top(imagenet_model, pool)
    head = build_head(embed_width(imagenet_model, depths), outputs, head_spec)
    return Classifier(imagenet_model, head, depths, global_pool)


def empty_classifier(timm_name: str, num_outputs_: int, head_spec: HeadSpec, depths: Sequence[int] = (),
                     pool: str | None = None) -> Classifier:
    """The architecture alone, for loading a saved run: no ImageNet weights are needed to predict."""
    backbone = timm.create_model(timm_name, pretrained=False, num_classes=0)
    return new_classifier(backbone, num_outputs_, head_spec, depths, pool)


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


@torch.inference_mode()
def evaluate_logits(module: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (fp32, on the CPU) and targets of an evaluation pass, with the module in inference mode."""
    module.eval()
    device = device or next(module.parameters()).device
    logits, targets = [], []
    for inputs, target in batches:
        if inputs.dim() == 4:  # images: channels_last is ~2x faster for these convolutions on CPU
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits.append(module(inputs.to(device, non_blocking=True)).float().cpu())
        targets.append(target)
    return torch.cat(logits), torch.cat(targets)
