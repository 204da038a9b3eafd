"""The Trainer: one object owns the model, config, task, compute, ranks and best-weights keeper, runs the loop of
every stage and fires events to its callbacks (training.callbacks). `fine_tune` reads like fastai's."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from transferkit.config import TrainConfig
from transferkit.data.loader import Labelled
from transferkit.data.transforms import Preprocess, eval_transform, train_transform
from transferkit.errors import UserError
from transferkit.features.extract import FeatureExtractor
from transferkit.models.classifier import Classifier, freeze_backbone
from transferkit.progress import Reporter
from transferkit.task.kinds import Task
from transferkit.training.callbacks import BatchEnd, Callback, Checkpointing, EarlyStopping
from transferkit.training.checkpoint import Checkpoints
from transferkit.training.compute import Compute, intra_op_threads
from transferkit.training.distributed import Ranks
from transferkit.training.optional import check_options, criterion, option_callbacks
from transferkit.training.state import BestKeeper, EpochLog, Position, Running, Stage, StepLog
from transferkit.training.two_stage import frozen_stage, unfrozen_stage


class Trainer:
    """Trains `model` for `task` as `config` says. `checkpoints`: save and resume (None: neither). On return from
    `fine_tune` (or Ctrl-C, which the caller catches) `keeper` holds the best weights seen."""

    def __init__(self, model: Classifier, config: TrainConfig, task: Task, compute: Compute, reporter: Reporter,
                 ranks: Ranks | None = None, checkpoints: Checkpoints | None = None,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.model, self.config, self.task, self.compute, self.reporter = model, config, task, compute, reporter
        self.ranks, self.checkpoints = ranks or Ranks(), checkpoints
        self.keeper = BestKeeper(config.monitor, config.patience)
        self.criterion = task.loss(config.label_smoothing)
        self.callbacks: list[Callback] = [EarlyStopping(), *([Checkpointing(checkpoints)] if checkpoints else [])]
        for callback in [*option_callbacks(config), *callbacks]:  # those the config asks for, then the caller's
            self.add_callback(callback)
        self.candidate: torch.nn.Module | None = None  # an epoch's weights for the keeper, if not the live ones (EMA)
        self.stage: Stage | None = None
        self.features: FeatureExtractor | None = None  # stage 1's, its engine compiled for the pretrained backbone
        self.start = Position("frozen")
        self.stop_stage = False
        self.diverged = False  # an epoch's loss or monitored value was not finite
        self.records: dict[str, dict] = {}  # meta.json entries callbacks add (the greedy soup's `soup`)

    def add_callback(self, callback: Callback) -> None:
        self.callbacks = sorted([*self.callbacks, callback], key=lambda c: c.order)

    def fire(self, event: str, *args: object) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def fine_tune(self, train: Labelled, val: Labelled, pre: Preprocess) -> None:
        """Train the new head on the frozen backbone, then unfreeze the top blocks and train on with lower rates. A
        loaded checkpoint's finished stages are skipped and its own stage goes on where it stopped."""
        transforms = self._prepare(pre, train)
        try:
            for name, build in (("frozen", frozen_stage), ("finetune", unfrozen_stage)):
                if not self._skips(name):
                    stage = build(self, train, val, pre, transforms)
                    if stage is not None:  # None: the head was solved in closed form
                        self.fit(stage, self._resume_point(stage))
        finally:
            self.fire("after_fit")
        self.model.requires_grad_(False)
        if self.diverged and self.keeper.best is None:
            raise UserError(f"training diverged: no epoch reached a finite {self.config.monitor}; lower the learning "
                            f"rate (lr {self.config.lr:g}, finetune_lr {self.config.finetune_lr:g})")

    def fit(self, stage: Stage, start: Position | None = None) -> None:
        """Train from `start` (default: the stage's beginning) for up to `stage.epochs`, validating each epoch."""
        with intra_op_threads(stage.threads):
            self._fit(stage, start)

    def _fit(self, stage: Stage, start: Position | None) -> None:
        self.stage, self.start, self.stop_stage = stage, start or Position(stage.name), False
        self.fire("before_stage", stage)
        for epoch in range(self.start.epoch, stage.epochs + 1):
            resumed = epoch == self.start.epoch
            begin, running = time.perf_counter(), self._running(resumed)
            self._train_epoch(epoch, self.start.step if resumed else 0, running)
            self._end_epoch(epoch, self.totals(running), time.perf_counter() - begin)
            if self.stop_stage or epoch == stage.epochs:
                break
        self.fire("after_stage", stage)
        self.stage = None

    def _train_epoch(self, epoch: int, first: int, running: Running) -> None:
        stage, compute = self.stage, self.compute
        stage.set_train_mode()
        with self.reporter.bar(f"{stage.name} {epoch}/{stage.epochs}", stage.n_train) as advance:
            if first:
                advance(min(first * stage.n_train // stage.steps, stage.n_train), "resumed")
            for step, (inputs, targets) in enumerate(stage.batches(epoch, first), start=first + 1):
                inputs, targets = compute.to_device(inputs), compute.to_device(targets)
                lr = stage.optimizer.param_groups[0]["lr"]  # this batch's rate: the schedule moves after its step
                with compute.autocast():
                    logits = stage.module(inputs)
                    loss = self.criterion(logits.float(), targets)
                compute.scaler.scale(loss / compute.accumulate).backward()
                stepped = step % compute.accumulate == 0 or step == stage.steps
                if stepped:  # every `accumulate` batches; the schedule advances per optimizer step
                    compute.scaler.step(stage.optimizer)
                    compute.scaler.update()
                    stage.optimizer.zero_grad(set_to_none=True)
                    stage.scheduler.step()
                n, batch_loss = targets.shape[0], loss.item()
                batch_correct = float(self.task.hits(logits.detach(), targets).sum())
                running.add(batch_loss, batch_correct, n)
                advance(n, f"loss {running.loss_sum / running.seen:.4f}")
                log = StepLog(stage.name, (epoch - 1) * stage.steps + step, batch_loss, batch_correct / n, lr)
                self.fire("after_batch", BatchEnd(log, epoch, step, stepped, running))

    def _end_epoch(self, epoch: int, running: Running, seconds: float) -> None:
        stage, self.candidate = self.stage, None
        val = stage.validate()
        seen = max(running.seen, 1)
        log = EpochLog.validated(epoch, stage.name, running.loss_sum / seen, running.correct / seen, val,
                                 stage.optimizer.param_groups[0]["lr"], seconds)
        self.reporter.log(f"{stage.name} epoch {epoch}/{stage.epochs}: loss {log.train_loss:.4f} "
                          f"acc {log.train_acc:.3f} | val loss {val.loss:.4f} acc {val.acc:.3f} | {log.seconds:.1f}s")
        if not math.isfinite(log.train_loss):
            self.reporter.warn(f"{stage.name}: the training loss is not finite (learning rate too high?); stopping")
            self.stop_stage = True
        self.diverged |= not (math.isfinite(log.train_loss) and math.isfinite(getattr(log, self.config.monitor)))
        self.fire("after_epoch", log)

    def _running(self, resumed: bool) -> Running:
        """A checkpoint holds the epoch's sums over all ranks: rank 0 carries them on, the others start from 0."""
        carried = resumed and (self.ranks.main or not self.stage.sharded)
        return self.start.running if carried else Running()

    def totals(self, running: Running) -> Running:
        """The epoch's sums over every rank when each sees a piece of every batch (DDP), else this rank's."""
        return self.ranks.total(running) if self.stage.sharded else running

    def _prepare(self, pre: Preprocess, train: Labelled) -> tuple:
        """Both stages' transforms (clean, augmented); the options checked against the data and the loss weighted
        by it; the model frozen, channels-last, and shaped like a loaded checkpoint's (the feature depths stage 1
        chose) before anything is built around it."""
        check_options(self.config, self.task, train)
        self.criterion = criterion(self.config, self.task, train)
        augment = self.config.augmentation()
        self.model.to(memory_format=torch.channels_last)
        freeze_backbone(self.model)
        if self.checkpoints and self.checkpoints.position:
            self.checkpoints.restore_depths(self.model)
        return eval_transform(pre, augment.samplewise_center), train_transform(pre, augment)

    def _skips(self, name: str) -> bool:
        """A stage with no epochs, or one a loaded checkpoint is past. A checkpoint taken as its stage ended leaves
        only the restore of its best weights."""
        epochs = self.config.epochs_frozen if name == "frozen" else self.config.epochs_finetune
        position = self.checkpoints.position if self.checkpoints else None
        if not epochs or (position is not None and position.after(name)):
            return True
        if position is not None and position.stage == name and position.stage_over:
            self.checkpoints.restore_model(self)
            self.keeper.restore(self.model)
            return True
        return False

    def _resume_point(self, stage: Stage) -> Position | None:
        position = self.checkpoints.position if self.checkpoints else None
        if position is None or position.stage != stage.name:
            return None
        self.checkpoints.restore_model(self)
        self.checkpoints.restore_stage(stage, self)
        self.reporter.log(f"resuming {stage.name} epoch {position.epoch} after {position.step} of {stage.steps} "
                          "batches")
        return position
