"""What happens around the training loop, as callbacks the Trainer fires events to (fastai's and ultralytics'
pattern): the run folder's history.csv and TensorBoard files, checkpoints, early stopping with the best-weights
keeper, and pausing after N fine-tuning epochs (auto's race). A new option is a new callback, not a new argument.

Events, in the order one stage fires them: before_stage, then per batch after_batch, per epoch after_epoch (and
after_checkpoint once its checkpoint is on disk), then after_stage; after_fit once both stages are over, however
they ended. Callbacks run in ascending `order`.
"""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transferkit.fileio import atomic_write
from transferkit.training.checkpoint import Checkpoints
from transferkit.training.state import EpochLog, Paused, Position, Running, Stage, StepLog

if TYPE_CHECKING:
    from transferkit.training.trainer import Trainer

HISTORY_FIELDS = list(EpochLog.__dataclass_fields__)


@dataclass
class BatchEnd:
    """One finished batch: its log, where it is in the epoch, and whether the optimizer stepped on it."""

    log: StepLog
    epoch: int
    step: int  # batches of this epoch done, from 1
    stepped: bool
    running: Running  # the epoch's sums so far (this rank's)


class Callback:
    """Override the events you need; each gets the Trainer, which owns the model, config, task and keeper."""

    order = 0

    def before_stage(self, trainer: Trainer, stage: Stage) -> None: ...

    def after_batch(self, trainer: Trainer, batch: BatchEnd) -> None: ...

    def after_epoch(self, trainer: Trainer, log: EpochLog) -> None: ...

    def after_checkpoint(self, trainer: Trainer, position: Position) -> None: ...

    def after_stage(self, trainer: Trainer, stage: Stage) -> None: ...

    def after_fit(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict | None:
        """What checkpoint.pt must carry for a resumed run to go on as this one would (None: nothing)."""
        return None

    def load_state_dict(self, trainer: Trainer, state: dict) -> None: ...


class EarlyStopping(Callback):
    """Stops a stage after `patience` epochs without a better monitored value (or a non-finite loss), and restores
    the best weights seen, across both stages, at the end of each."""

    order = 10

    def before_stage(self, trainer: Trainer, stage: Stage) -> None:
        if (trainer.start.epoch, trainer.start.step) == (1, 0):  # a resumed stage carries its patience count on
            trainer.keeper.start_stage()

    def after_epoch(self, trainer: Trainer, log: EpochLog) -> None:
        if trainer.stop_stage:  # already stopping (a non-finite loss): this epoch is no candidate
            return
        keeper = trainer.keeper
        if keeper.update(log, trainer.model if trainer.candidate is None else trainer.candidate):
            trainer.reporter.log(f"early stop: no better {keeper.monitor} for {keeper.patience} epochs")
            trainer.stop_stage = True

    def after_stage(self, trainer: Trainer, stage: Stage) -> None:
        trainer.keeper.restore(trainer.model)


class Checkpointing(Callback):
    """checkpoint.pt every `checkpoints.every` optimizer steps and at each epoch's end, after early stopping has
    decided, so a resumed run never trains past where this one stopped."""

    order = 20

    def __init__(self, checkpoints: Checkpoints) -> None:
        self.checkpoints = checkpoints

    def after_batch(self, trainer: Trainer, batch: BatchEnd) -> None:
        stage = trainer.stage
        if batch.stepped and batch.step < stage.steps and self.checkpoints.due(batch.epoch, batch.step, stage):
            self._save(trainer, Position(stage.name, batch.epoch, batch.step, trainer.totals(batch.running)))

    def after_epoch(self, trainer: Trainer, log: EpochLog) -> None:
        self.checkpoints.history.append(log)
        if trainer.stage is None:  # a head solved in closed form: no stage to resume
            return
        over = trainer.stop_stage or log.epoch == trainer.stage.epochs
        self._save(trainer, Position(log.stage, log.epoch + 1, 0, Running(), over))

    def _save(self, trainer: Trainer, position: Position) -> None:
        self.checkpoints.save(trainer.stage, trainer, position)
        trainer.fire("after_checkpoint", position)


class PauseAfter(Callback):
    """Stops training once `epochs` fine-tuning epochs are done and checkpointed (raising Paused): `resume` goes on
    from there to the result an uninterrupted run gets. A stage that ends sooner finishes as usual."""

    order = 30

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def after_checkpoint(self, trainer: Trainer, position: Position) -> None:
        done = position.epoch - 1
        if position.stage == "finetune" and position.step == 0 and done == self.epochs and not position.stage_over:
            raise Paused


class History(Callback):
    """history.csv grows by one row per epoch, so a crash still leaves the curve so far. It starts with `rows`:
    none for a new run, a resumed run's epochs up to its checkpoint (rows after it were redone, not repeated)."""

    def __init__(self, path: Path, rows: list[EpochLog] = ()) -> None:
        self.path = path
        text = io.StringIO()
        writer = csv.DictWriter(text, HISTORY_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(log.to_dict() for log in rows)
        atomic_write(path, text.getvalue())

    def after_epoch(self, trainer: Trainer, log: EpochLog) -> None:
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, HISTORY_FIELDS).writerow(log.to_dict())


class TensorBoard(Callback):
    """RUN/tb event files: loss, accuracy and learning rate per step and per epoch, one tag group per stage."""

    STEP_TAGS = ("loss", "acc", "lr")
    EPOCH_TAGS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "lr")

    def __init__(self, folder: Path, fresh: bool = True) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard (~1 s): only runs that train pay

        # A new run starts afresh: a crashed run's events left in a reused folder would mix with these. A resumed
        # run adds a file beside its earlier ones (steps redone after the checkpoint appear twice in TensorBoard).
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
        # With the default queue of 10, logging waits on the writer thread's disk writes (measured: 2x the time).
        self.writer = SummaryWriter(str(folder), max_queue=1000)

    def after_batch(self, trainer: Trainer, batch: BatchEnd) -> None:
        for tag in self.STEP_TAGS:
            self.writer.add_scalar(f"{batch.log.stage}/step/{tag}", getattr(batch.log, tag), batch.log.step)

    def after_epoch(self, trainer: Trainer, log: EpochLog) -> None:
        for tag in self.EPOCH_TAGS:
            self.writer.add_scalar(f"{log.stage}/epoch/{tag}", getattr(log, tag), log.epoch)

    def after_fit(self, trainer: Trainer) -> None:
        self.writer.close()  # flushed however training ended
