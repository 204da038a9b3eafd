"""One training loop for both stages, early stopping with best-state restore, and the loss for each task."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from transferkit.progress import Reporter
from transferkit.training.compute import Compute
from transferkit.training.distributed import Ranks

if TYPE_CHECKING:
    from transferkit.training.checkpoint import Checkpoints

Batches = Callable[[int, int], Iterable[tuple[torch.Tensor, torch.Tensor]]]
# (logits, targets) -> (N,) how right each image's prediction is, 1 or 0 (or, multi-label, the fraction of its
# labels right): the accuracy in the training log is its mean.
Hits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def loss_fn(binary: bool, label_smoothing: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Binary: one logit, BCE-with-logits (logit > 0 means the second class). Otherwise softmax cross-entropy."""
    if binary:

        def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            soft = targets.float() * (1 - label_smoothing) + 0.5 * label_smoothing
            return F.binary_cross_entropy_with_logits(logits[:, 0], soft)

        return bce
    return lambda logits, targets: F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def probabilities(logits: torch.Tensor, binary: bool, multilabel: bool = False, temperature: float = 1.0
                  ) -> torch.Tensor:
    """Per-class probabilities, (N, C) for every task, so everything downstream is task-agnostic; a multi-label
    run's are independent (one sigmoid per label), the others' sum to 1. `temperature`: the run's calibration
    (transferkit.calibration), dividing every logit."""
    logits = logits.float() / temperature
    if multilabel:
        return torch.sigmoid(logits.float())
    if binary:
        p = torch.sigmoid(logits[:, 0].float())
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits.float(), dim=1)


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
        better = self.best is None or (value < self.best if self.monitor == "val_loss" else value > self.best)
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, (log.stage, log.epoch), 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad_epochs += 1
        return self.patience > 0 and self.bad_epochs >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


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
    validate: Callable[[], tuple[float, float]]
    epochs: int
    steps: int  # batches per epoch, so an epoch's last partial accumulation still steps
    sharded: bool = False  # each rank sees its piece of every batch (DDP): epoch sums are totalled over ranks


@dataclass
class FitContext:
    """What stays the same across stages: the loss, the task, early stopping and where epochs are reported."""

    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    hits: Hits
    keeper: BestKeeper
    model: nn.Module  # the whole classifier, whose best state the keeper holds
    reporter: Reporter
    on_epoch: Callable[[EpochLog], None]
    compute: Compute
    on_step: Callable[[StepLog], None] | None = None
    checkpoints: Checkpoints | None = None
    ranks: Ranks = field(default_factory=Ranks)
    pause_after: int | None = None  # fine-tuning epochs after which to raise Paused (needs checkpoints)


def fit(stage: Stage, ctx: FitContext, start: Position | None = None) -> None:
    """Train from `start` (default: the stage's beginning) for up to `stage.epochs`, validating each epoch; stops
    early on patience or a non-finite loss; checkpoints every `checkpoints.every` optimizer steps and each epoch."""
    start = start or Position(stage.name)
    if (start.epoch, start.step) == (1, 0):
        ctx.keeper.start_stage()
    for epoch in range(start.epoch, stage.epochs + 1):
        begin, first = time.perf_counter(), start.step if epoch == start.epoch else 0
        # a checkpoint holds the epoch's sums over all ranks: rank 0 carries them on, the others start from 0
        carried = epoch == start.epoch and (ctx.ranks.main or not stage.sharded)
        running = start.running if carried else Running()
        stage.set_train_mode()
        with ctx.reporter.bar(f"{stage.name} {epoch}/{stage.epochs}", stage.n_train) as advance:
            if first:
                advance(min(first * stage.n_train // stage.steps, stage.n_train), "resumed")
            for step, (inputs, targets) in enumerate(stage.batches(epoch, first), start=first + 1):
                inputs, targets = ctx.compute.to_device(inputs), ctx.compute.to_device(targets)
                lr = stage.optimizer.param_groups[0]["lr"]  # this batch's rate: the schedule moves after its step
                # 1. forward and loss (autocast under mixed precision)
                with ctx.compute.autocast():
                    logits = stage.module(inputs)
                    loss = ctx.criterion(logits.float(), targets)
                # 2. backward; step every `accumulate` batches (the schedule advances per optimizer step)
                ctx.compute.scaler.scale(loss / ctx.compute.accumulate).backward()
                stepped = step % ctx.compute.accumulate == 0 or step == stage.steps
                if stepped:
                    ctx.compute.scaler.step(stage.optimizer)
                    ctx.compute.scaler.update()
                    stage.optimizer.zero_grad(set_to_none=True)
                    stage.scheduler.step()
                # 3. running statistics for the epoch line; the batch's own for the step hook (TensorBoard)
                n, batch_loss = targets.shape[0], loss.item()
                batch_correct = float(ctx.hits(logits.detach(), targets).sum())
                running.add(batch_loss, batch_correct, n)
                advance(n, f"loss {running.loss_sum / running.seen:.4f}")
                if ctx.on_step:
                    ctx.on_step(StepLog(stage.name, (epoch - 1) * stage.steps + step, batch_loss,
                                        batch_correct / n, lr))
                if ctx.checkpoints and stepped and step < stage.steps and ctx.checkpoints.due(epoch, step, stage):
                    ctx.checkpoints.save(stage, ctx, Position(stage.name, epoch, step, _totals(stage, ctx, running)))
        # 4. validate, log, keep the best, maybe stop early
        totals = _totals(stage, ctx, running)
        over = not _end_epoch(stage, ctx, epoch, totals, time.perf_counter() - begin) or epoch == stage.epochs
        if ctx.checkpoints:
            ctx.checkpoints.save(stage, ctx, Position(stage.name, epoch + 1, 0, Running(), over))
        if over:
            break
        if ctx.checkpoints and stage.name == "finetune" and epoch == ctx.pause_after:
            raise Paused
    ctx.keeper.restore(ctx.model)


def _totals(stage: Stage, ctx: FitContext, running: Running) -> Running:
    return ctx.ranks.total(running) if stage.sharded else running


def _end_epoch(stage: Stage, ctx: FitContext, epoch: int, running: Running, seconds: float) -> bool:
    """Validate, log and update early stopping after an epoch; False when the stage must stop."""
    val_loss, val_acc = stage.validate()
    seen = max(running.seen, 1)
    log = EpochLog(epoch, stage.name, running.loss_sum / seen, running.correct / seen, val_loss, val_acc,
                   stage.optimizer.param_groups[0]["lr"], seconds)
    ctx.on_epoch(log)
    ctx.reporter.log(f"{stage.name} epoch {epoch}/{stage.epochs}: loss {log.train_loss:.4f} "
                     f"acc {log.train_acc:.3f} | val loss {val_loss:.4f} acc {val_acc:.3f} | {log.seconds:.1f}s")
    if not math.isfinite(log.train_loss):
        ctx.reporter.warn(f"{stage.name}: the training loss is not finite (learning rate too high?); stopping")
        return False
    if ctx.keeper.update(log, ctx.model):
        ctx.reporter.log(f"early stop: no better {ctx.keeper.monitor} for {ctx.keeper.patience} epochs")
        return False
    return True


def predicted_class(logits: torch.Tensor, binary: bool) -> torch.Tensor:
    return (logits[:, 0] > 0).long() if binary else logits.argmax(dim=1)


def single_label_hits(binary: bool) -> Hits:
    """1 for each image whose predicted class is its class."""
    return lambda logits, targets: (predicted_class(logits, binary) == targets).float()


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


def loss_and_accuracy(logits: torch.Tensor, targets: torch.Tensor, criterion: Callable, hits: Hits
                      ) -> tuple[float, float]:
    return float(criterion(logits, targets)), float(hits(logits, targets).mean())
