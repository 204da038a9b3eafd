"""An exponential moving average of the weights while fine-tuning (timm's `ModelEmaV3`), as a callback: the
average often generalises better than the last weights, at the cost of one lerp per optimizer step and one more
validation pass per epoch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transferkit.options import as_loss
from transferkit.training.callbacks import BatchEnd, Callback
from transferkit.training.state import EpochLog, Scores, Stage

if TYPE_CHECKING:
    from transferkit.training.trainer import Trainer


class WeightAverage(Callback):
    """Averages the weights after each optimizer step of the unfrozen stage, validates the average beside the live
    weights at each epoch's end, and offers the keeper the better of the two on the monitored value (the epoch's
    log, history.csv included, then holds the average's validation and `weights` "ema"). Its state goes into
    checkpoint.pt, so a resumed run averages on exactly as an uninterrupted one."""

    order = -10  # before History writes the epoch's row and EarlyStopping judges it

    def __init__(self, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        self.ema = None  # timm.utils.ModelEmaV3 while the unfrozen stage runs
        self.loaded: dict | None = None  # a checkpoint's average, until the stage starts

    def before_stage(self, trainer: Trainer, stage: Stage) -> None:
        if stage.name != "finetune":
            return
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(trainer.model, decay=self.decay, use_warmup=self.warmup)
        if self.loaded is not None:
            self.ema.module.load_state_dict(self.loaded)
            self.loaded = None

    def after_batch(self, trainer: Trainer, batch: BatchEnd) -> None:
        if self.ema is not None and batch.stepped:  # the schedule's step count drives timm's decay warmup
            self.ema.update(trainer.model, step=trainer.stage.scheduler.last_epoch)

    def after_epoch(self, trainer: Trainer, log: EpochLog) -> None:
        if self.ema is None or trainer.stop_stage:
            return
        val, monitor = self._validate_average(trainer), trainer.keeper.monitor
        better = as_loss(val.of(monitor), monitor) < as_loss(getattr(log, monitor), monitor)
        trainer.reporter.log(f"{log.stage} epoch {log.epoch}/{trainer.stage.epochs}: EMA weights val loss "
                             f"{val.loss:.4f} acc {val.acc:.3f} ({'better' if better else 'no better'} than the live "
                             "weights)")
        if better:
            log.record(val)
            log.weights = "ema"
            trainer.candidate = self.ema.module

    def after_stage(self, trainer: Trainer, stage: Stage) -> None:
        self.ema = None

    def state_dict(self) -> dict | None:
        return None if self.ema is None else self.ema.module.state_dict()

    def load_state_dict(self, trainer: Trainer, state: dict) -> None:
        self.loaded = state  # the average is rebuilt around the model when its stage starts

    def _validate_average(self, trainer: Trainer) -> Scores:
        """The stage's own validation with the average's weights swapped in (the frozen part is the same in both, so
        a compiled frozen prefix stays valid), then the live ones back."""
        model = trainer.model
        live = {key: value.clone() for key, value in model.state_dict().items()}
        model.load_state_dict(self.ema.module.state_dict())
        try:
            return trainer.stage.validate()
        finally:
            model.load_state_dict(live)
