"""Mixup and CutMix (timm's `Mixup`) on the fine-tuning batches: a step of the unfrozen stage, between its batches
and the loop. Targets become soft rows (the Task's loss and hits take them)."""

from __future__ import annotations

import numpy as np
import torch

from transferkit.config import TrainConfig
from transferkit.data.loader import seeded
from transferkit.task.kinds import Task
from transferkit.training.state import Batches


def mixed(batches: Batches, config: TrainConfig, task: Task) -> Batches:
    """`batches` mixed (mixup and/or CutMix, one of them per batch when both alphas are on), or as they are when
    both are 0. Each batch's draw is seeded by (seed, epoch, batch), so a resumed epoch mixes its batches alike."""
    if not (config.mixup or config.cutmix):
        return batches
    from timm.data import Mixup

    # smoothing is the loss's (it commutes with mixing): timm's would smooth a second time
    mix = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=0.0,
                num_classes=len(task.classes), multi_label=task.multilabel)

    def mixed_batches(epoch: int, skip: int):
        for index, (images, targets) in enumerate(batches(epoch, skip), start=skip):
            with seeded(int(np.random.SeedSequence([config.seed, epoch, index]).generate_state(1)[0])):
                yield mix_batch(mix, images, targets)

    return mixed_batches


def mix_batch(mix, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch mixed in place and its soft targets. timm mixes image i with image n-1-i of an even batch, so an
    odd batch's last image stays as it is, with its own target as a one-hot row."""
    from timm.data.mixup import mixup_target

    even = len(images) - len(images) % 2
    soft = mixup_target(targets, mix.num_classes, 1.0, 0.0, mix.multi_label)
    if even:
        _, soft[:even] = mix(images[:even], targets[:even])  # mixes the view, so `images` itself
    return images, soft
