"""Optimizers and learning-rate schedules (per step, with linear warmup), as the tutorials configure them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

from transferkit.config import TrainConfig

if TYPE_CHECKING:
    from transferkit.models.classifier import Classifier


def build_optimizer(name: str, param_groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    wd = config.weight_decay
    if name == "adam":
        return torch.optim.Adam(param_groups, eps=config.adam_eps, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, eps=config.adam_eps, weight_decay=wd)
    if name == "rmsprop":  # Keras' RMSprop defaults: rho 0.9, eps 1e-7
        return torch.optim.RMSprop(param_groups, alpha=0.9, eps=1e-7, weight_decay=wd)
    return torch.optim.SGD(param_groups, momentum=config.momentum, nesterov=True, weight_decay=wd)


def finetune_groups(model: Classifier, backbone_params: list[torch.nn.Parameter], config: TrainConfig
                    ) -> list[dict]:
    """Stage 2's parameter groups: the head at finetune_lr, the unfrozen backbone at finetune_lr * backbone_lr_mult,
    with `layer_decay` < 1 scaled per layer: the backbone's top layer by 1, each one below by layer_decay more
    (BEiT's layer-wise decay; timm numbers the layers with the backbone's fine group_matcher)."""
    head = {"params": list(model.head.parameters()), "lr": config.finetune_lr}
    rate = config.finetune_lr * config.backbone_lr_mult
    if config.layer_decay == 1.0:
        return [head, {"params": backbone_params, "lr": rate}]
    from timm.optim import param_groups_layer_decay

    # the frozen layers are left out (no gradient); every trained one keeps the configured weight decay
    layers = param_groups_layer_decay(model.backbone, weight_decay=config.weight_decay, weight_decay_exclude_1d=False,
                                      layer_decay=config.layer_decay)
    return [head, *({"params": group["params"], "lr": rate * group["lr_scale"]} for group in layers)]


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int, decay: float) -> float:
    """Multiplier of the base learning rate at `step`; warmup ramps linearly from near 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "inverse_time":
        return 1.0 / (1.0 + decay * step)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    # one-cycle: warm up over the first 30% (unless warmup is given), then cosine anneal to 1/1000 of the peak
    return max(1e-3, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int, epochs: int
) -> LambdaLR:
    total = max(1, steps_per_epoch * epochs)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "onecycle" and not warmup:
        warmup = int(0.3 * total)
    return LambdaLR(optimizer, lambda step: lr_factor(config.schedule, step, total, warmup, config.lr_decay))
