"""Resume after a crash: RUN/checkpoint.pt holds everything training needs to go on exactly where it stopped.

Written atomically (temp file, fsync, rename: `fileio.atomic_path`), so after `kill -9` at any moment the file is
the previous complete checkpoint or the new one, never half of one. Saved every `checkpoint_every` optimizer steps
and at the end of every epoch. What it holds, and why each part is needed for an identical continuation:

- position: stage, epoch, batches done in that epoch, the epoch's running loss sums, and whether the stage is over
  (last epoch, early stop or a non-finite loss: a resumed run must not train past where the original stopped);
- the model's weights, the stage's optimizer, scheduler and (AMP) loss-scaler states — the optimizer is rebuilt
  for its stage first, so stage 2's parameter groups (head + unfrozen blocks) match the saved state;
- early stopping (best value, best weights, patience count) and the epoch log so far (history.csv is rewritten
  from it: rows of an epoch that was redone never appear twice);
- what callbacks carry (`Callback.state_dict`): the greedy soup's candidate epochs and its record,
  the EMA of the weights;
- the global RNG states (dropout), since the data order and augmentation draw from per-epoch seeds instead
  (`epoch_generator`), which makes batch k of epoch e the same whether or not the run was interrupted.

The feature cache needs no state of its own: its shards are content-keyed and atomic, so a resumed stage 1 finds
the features computed before the crash and computes the rest.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from transferkit.errors import UserError
from transferkit.fileio import atomic_path, remove_partial_writes
from transferkit.models.classifier import Classifier, set_depths
from transferkit.training.state import BestKeeper, EpochLog, Position, Running, Stage

if TYPE_CHECKING:
    from transferkit.training.trainer import Trainer

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


def _rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class Checkpoints:
    """Saves checkpoints of one run folder and hands a loaded one back to the stage it belongs to."""

    def __init__(self, folder: Path, every: int, resume: bool, writes: bool = True) -> None:
        self.path = folder / CHECKPOINT
        self.every, self.writes = every, writes  # of several ranks, rank 0 alone writes; all of them read
        self.history: list[EpochLog] = []
        self.saved: dict | None = _read(self.path) if resume and self.path.exists() else None
        if self.saved:
            self.history = [EpochLog(**row) for row in self.saved["history"]]

    @property
    def position(self) -> Position | None:
        if self.saved is None:
            return None
        saved = self.saved["position"]
        return Position(**{**saved, "running": Running(**saved["running"])})

    def due(self, epoch: int, step: int, stage: Stage) -> bool:
        """Every `every` optimizer steps of the stage, counted across its epochs."""
        return self.every > 0 and ((epoch - 1) * stage.steps + step) % self.every == 0

    def save(self, stage: Stage, trainer: Trainer, position: Position) -> None:
        """Write the whole training state at `position`."""
        if not self.writes:
            return
        keeper = trainer.keeper
        state = {
            "format": FORMAT,
            "position": asdict(position),
            "model": _trained_part(trainer.model.state_dict(), stage),
            "depths": list(trainer.model.depths),  # chosen on validation (feature_depths auto): the head's width
            "optimizer": stage.optimizer.state_dict(),
            "scheduler": stage.scheduler.state_dict(),
            "scaler": trainer.compute.scaler.state_dict(),
            "keeper": {"best": keeper.best, "best_state": keeper.best_state and _trained_part(keeper.best_state, stage),
                       "best_epoch": keeper.best_epoch,
                       "bad_epochs": keeper.bad_epochs},
            "history": [log.to_dict() for log in self.history],
            "callbacks": {type(c).__name__: state for c in trainer.callbacks if (state := c.state_dict()) is not None},
            "rng": _rng_states(),
        }
        with atomic_path(self.path) as tmp:  # a full disk: one line, and the previous checkpoint stays whole
            torch.save(state, tmp)

    def restore_depths(self, model: Classifier) -> None:
        """The feature depths stage 1 chose before the checkpoint, so the head has their width (before anything is
        built around the model: stage 2's engine, the optimizer)."""
        depths = tuple(self.saved.get("depths", ())) if self.saved else ()
        if depths != model.depths:
            set_depths(model, depths)

    def restore_model(self, trainer: Trainer) -> None:
        """The saved weights, early-stopping state and RNG states, before the stage's own states are loaded."""
        saved = self.saved
        current = copy.deepcopy(trainer.model.state_dict())  # the pretrained backbone, for a stage-1 checkpoint
        trainer.model.load_state_dict({**current, **saved["model"]})
        keeper: BestKeeper = trainer.keeper
        k = saved["keeper"]
        keeper.best, keeper.bad_epochs = k["best"], k["bad_epochs"]
        keeper.best_state = k["best_state"] and {**current, **k["best_state"]}
        keeper.best_epoch = tuple(k["best_epoch"]) if k["best_epoch"] else None
        for callback in trainer.callbacks:  # e.g. the greedy soup's candidates from before the crash
            if (state := saved.get("callbacks", {}).get(type(callback).__name__)) is not None:
                callback.load_state_dict(trainer, state)
        _set_rng_states(saved["rng"])

    def restore_stage(self, stage: Stage, trainer: Trainer) -> None:
        """The optimizer, schedule and loss-scaler of the stage the checkpoint was taken in."""
        stage.optimizer.load_state_dict(self.saved["optimizer"])
        stage.scheduler.load_state_dict(self.saved["scheduler"])
        trainer.compute.scaler.load_state_dict(self.saved["scaler"])

    def remove(self) -> None:
        """Once the run is saved the checkpoint is only a large duplicate of model.safetensors, and what a killed
        process left half-written (a checkpoint, a log) is garbage."""
        self.path.unlink(missing_ok=True)
        remove_partial_writes(self.path.parent)


def _trained_part(state: dict, stage: Stage) -> dict:
    """In the frozen stage only the head's entries: the backbone is the pretrained one, rebuilt on resume, and
    leaving it out makes a stage-1 checkpoint ~100x smaller (they come once per epoch of a ~0.2 s epoch)."""
    if stage.name != "frozen":
        return state
    return {key: value for key, value in state.items() if key.startswith("head.")}


def _read(path: Path) -> dict:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file means the same thing to the user
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}); "
                        "delete it to restart the run from the beginning") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise UserError(f"{path} was written by another version of transferkit; delete it to restart the run")
    return saved
