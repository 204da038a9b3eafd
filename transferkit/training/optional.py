"""The training options that are steps of a stage or callbacks, switched on by the config alone (so `api` does not
change when one is added): the callbacks they need, what they refuse before anything trains, the loss with class
weights, and each epoch's order of images (shuffled, or classes drawn evenly)."""

from __future__ import annotations

import torch

from transferkit.config import TrainConfig
from transferkit.data.loader import Labelled
from transferkit.data.stream import is_sharded
from transferkit.errors import UserError
from transferkit.task.kinds import Loss, Task
from transferkit.training.callbacks import Callback
from transferkit.training.ema import WeightAverage
from transferkit.training.soup import soup_callbacks


def option_callbacks(config: TrainConfig) -> list[Callback]:
    """The callbacks the config's options need (the Trainer adds them itself): the EMA of the weights, the soup."""
    return [*([WeightAverage(config.ema_decay, config.ema_warmup)] if config.ema_decay else []),
            *soup_callbacks(config)]


def check_options(config: TrainConfig, task: Task, train: Labelled) -> None:
    """Refuse, before anything trains, an option this data cannot have."""
    if config.class_balance == "sampler" and task.multilabel:
        raise UserError("class_balance sampler draws one class per image; for multi-label data use "
                        "class_balance weights (a positive weight per label)")
    if config.class_balance == "sampler" and is_sharded(train):
        raise UserError("class_balance sampler needs images read by index, not streamed packed shards; use "
                        "class_balance weights")


def criterion(config: TrainConfig, task: Task, train: Labelled) -> Loss:
    """The task's loss, with inverse-frequency class weights of the training images when class_balance is weights."""
    weights = task.class_weights(train.targets) if config.class_balance == "weights" else None
    return task.loss(config.label_smoothing, weights)


def epoch_order(targets: torch.Tensor, class_balance: str, generator: torch.Generator) -> torch.Tensor:
    """One epoch's image indices from the epoch's generator (so a resumed epoch replays them): a permutation, or
    with class_balance sampler as many draws with replacement, each class equally likely."""
    if class_balance != "sampler":
        return torch.randperm(len(targets), generator=generator)
    counts = torch.bincount(targets)
    return torch.multinomial(1.0 / counts[targets].double(), len(targets), replacement=True, generator=generator)
