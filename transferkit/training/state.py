"""What training keeps between batches, epochs and stages: the logs, the position, a stage's parts and the best
weights seen (early stopping). The loop itself is `training.trainer.Trainer.fit`."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from transferkit.options import as_loss

Batches = Callable[[int, int], Iterable[tuple[torch.Tensor, torch.Tensor]]]
# (logits, targets) -> (N,) how right each image's prediction is, 1 or 0 (or, multi-label, the fraction of its
# labels right): the accuracy in the training log is its mean.
Hits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Scores:
    """A validation pass: the task's loss, accuracy and balanced accuracy (the mean of per-class recalls)."""

    loss: float
    acc: float
    balanced_acc: float

    def of(self, monitor: str) -> float:
        return {"val_loss": self.loss, "val_acc": self.acc, "val_balanced_acc": self.balanced_acc}[monitor]


@dataclass
class EpochLog:
    epoch: int
    stage: str
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float
    weights: str = "live"  # which weights the val figures are of: live, or ema (training.ema) when those won
    val_balanced_acc: float = math.nan  # nan in logs written before it existed

    @classmethod
    def validated(cls, epoch: int, stage: str, train_loss: float, train_acc: float, val: Scores, lr: float,
                  seconds: float) -> EpochLog:
        """An epoch's log with its validation `val`."""
        return cls(epoch, stage, train_loss, train_acc, val.loss, val.acc, lr, seconds,
                   val_balanced_acc=val.balanced_acc)

    def record(self, scores: Scores) -> None:
        self.val_loss, self.val_acc, self.val_balanced_acc = scores.loss, scores.acc, scores.balanced_acc

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepLog:
    """One training batch: its loss and accuracy (values the loop already has on the CPU) and learning rate."""

    stage: str
    step: int  # batches since the stage began, from 1
    loss: float
    acc: float
    lr: float


class BestKeeper:
    """Early stopping on a validation metric across both stages; keeps the best weights to restore."""

    def __init__(self, monitor: str, patience: int) -> None:
        self.monitor, self.patience = monitor, patience
        self.best: float | None = None
        self.best_state: dict | None = None
        self.best_epoch: tuple[str, int] | None = None
        self.bad_epochs = 0

    def start_stage(self) -> None:
        self.bad_epochs = 0

    def update(self, log: EpochLog, model: nn.Module) -> bool:
        """Record an epoch; True means stop this stage."""
        value = getattr(log, self.monitor)
        # a diverged epoch (NaN or infinite) is never kept: NaN compares false with everything that comes after it
        better = math.isfinite(value) and (self.best is None or
                                           as_loss(value, self.monitor) < as_loss(self.best, self.monitor))
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, (log.stage, log.epoch), 0
            self.best_state = copied_state(model.state_dict(), self.best_state)
        else:
            self.bad_epochs += 1
        return self.patience > 0 and self.bad_epochs >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def copied_state(state: dict, into: dict | None) -> dict:
    """A copy of a state dict, written into `into`'s tensors when it has the same entries: a fresh copy of the
    backbone at every better epoch cost more than the head's whole epoch (allocation; decision 0261)."""
    same = into is not None and into.keys() == state.keys() and all(
        isinstance(v, torch.Tensor) and isinstance(into[k], torch.Tensor) and into[k].shape == v.shape
        and into[k].dtype == v.dtype and into[k].device == v.device for k, v in state.items())
    if not same:
        return copy.deepcopy(state)
    for key, value in state.items():
        into[key].copy_(value)
    return into


STAGE_ORDER = ("frozen", "finetune")


class Paused(Exception):
    """Training stopped on purpose after a fine-tuning epoch, its checkpoint written: `api.resume` goes on from
    there to the same result as an uninterrupted run (auto's race trains each finalist a few epochs this way)."""


def epoch_generator(seed: int, stage: str, epoch: int) -> torch.Generator:
    """The random source of one epoch's data order and augmentation: a function of (seed, stage, epoch) only, so
    batch k of epoch e is the same whether the run went straight through or was resumed mid-epoch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGE_ORDER.index(stage) * 10_007 + epoch)


@dataclass
class Running:
    """An epoch's sums so far, which its train loss and accuracy are averaged from."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: int = 0

    def add(self, loss: float, correct: float, n: int) -> None:
        self.loss_sum, self.correct, self.seen = self.loss_sum + loss * n, self.correct + correct, self.seen + n


@dataclass
class Position:
    """Where training is: `step` batches of `epoch` done (epoch-end checkpoints point at the next epoch's start);
    a stage is over after its last epoch, an early stop or a non-finite loss."""

    stage: str
    epoch: int = 1
    step: int = 0
    running: Running = field(default_factory=Running)
    stage_over: bool = False

    def after(self, stage: str) -> bool:
        """True when this position is past the whole of `stage` (a later stage has begun)."""
        return STAGE_ORDER.index(self.stage) > STAGE_ORDER.index(stage)


@dataclass
class Stage:
    """One stage of training: what learns, on which batches, for how long."""

    name: str
    module: nn.Module  # what the batches go through (the head alone in stage 1)
    set_train_mode: Callable[[], None]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Batches  # (epoch, batches to skip) -> the epoch's batches from there on
    n_train: int
    validate: Callable[[], Scores]
    epochs: int
    steps: int  # batches per epoch, so an epoch's last partial accumulation still steps
    sharded: bool = False  # each rank sees its piece of every batch (DDP): epoch sums are totalled over ranks
    threads: int | None = None  # PyTorch CPU threads while the stage trains (None: as configured)
