"""The race: the two backbones the probe ranks highest each train as a real run until RACE_EPOCHS fine-tuning epochs
are done (or their runs end: a plan without fine-tuning races the frozen stages, decision 0304); the one with the
better validation score then goes on from its checkpoint (none of its work is redone) and the other is dropped.
Successive halving (Jamieson & Talwalkar 2016) with two arms and one cut.

Why not trust the probe alone: it ranks frozen features, and what the user gets is a fine-tuned network; the two
orders disagreed on the demo data (decision 0221)."""

from __future__ import annotations

import csv
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit import api
from transferkit.auto.plan import RACE_EPOCHS
from transferkit.config import TrainConfig
from transferkit.data.sources import DatasetIndex
from transferkit.options import as_loss
from transferkit.progress import Reporter
from transferkit.report import write_report
from transferkit.runs.ensemble import MEMBERS, ensemble_gain, write_ensemble
from transferkit.runs.run import Run
from transferkit.training.callbacks import PauseAfter

RACE_FOLDER = "race"  # inside the run folder while the race lasts: RUN/race/BACKBONE/


@dataclass(frozen=True)
class Lap:
    """Where a finalist stood when the race ended: its best validation loss and accuracy over its fine-tuning
    epochs (not the frozen head's: fine-tuning first climbs above it, and what is raced is where fine-tuning gets),
    and whether its run is already complete (its epochs or early stopping ended it within the race)."""

    name: str
    val_loss: float
    val_acc: float
    finetune_epochs: int
    seconds: float
    finished: bool
    val_balanced_acc: float = math.nan

    def score(self, monitor: str) -> float:
        """Lower is better."""
        return as_loss(getattr(self, monitor), monitor)

    def standard_error(self, monitor: str, val_images: int) -> float:
        """Of the score, over `val_images` images. Per-image log-losses are roughly exponentially distributed, so
        their sd is about their mean and the mean's standard error about mean / sqrt(n); an accuracy's is
        sqrt(p (1 - p) / n)."""
        if monitor == "val_loss":
            return self.val_loss / math.sqrt(val_images)
        accuracy = getattr(self, monitor)
        return math.sqrt(accuracy * (1 - accuracy) / val_images)

    def to_json(self) -> dict:
        return {"backbone": self.name, "val_loss": round(self.val_loss, 5), "val_acc": round(self.val_acc, 5),
                "val_balanced_acc": round(self.val_balanced_acc, 5), "finetune_epochs": self.finetune_epochs,
                "seconds": round(self.seconds, 1), "finished": self.finished}


def race(finalists: dict[str, dict[str, Any]], index: DatasetIndex, out: Path, quiet: bool,
         options: dict[str, Any]) -> list[Lap]:
    """Train each finalist (name -> its api.train options, merged over `options`) in RUN/race/NAME until
    RACE_EPOCHS fine-tuning epochs are done; their laps, in the order they ran."""
    laps = []
    for name, choices in finalists.items():
        start = time.perf_counter()
        run = api.train(index, out / RACE_FOLDER / name, overwrite=True, quiet=quiet,
                        callbacks=[PauseAfter(RACE_EPOCHS)], **{**options, **choices})
        laps.append(read_lap(name, out / RACE_FOLDER / name, time.perf_counter() - start, run is not None))
    return laps


def read_lap(name: str, folder: Path, seconds: float, finished: bool) -> Lap:
    """The best fine-tuning epochs of a finalist's history.csv (all its epochs if it never fine-tuned)."""
    with (folder / "history.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    finetune = [row for row in rows if row["stage"] == "finetune"]
    raced = finetune or rows
    return Lap(name, min(float(row["val_loss"]) for row in raced), max(float(row["val_acc"]) for row in raced),
               len(finetune), seconds, finished, max(float(row["val_balanced_acc"]) for row in raced))


def winner(laps: list[Lap], monitor: str, val_images: int) -> Lap:
    """The better score, when it is better than the first finalist's (the probe's pick, the cheaper of a probe tie)
    by more than one standard error of that score; within it the pick stays: smaller leads were noise on the demo
    data (decision 0221)."""
    first, best = laps[0], min(laps, key=lambda lap: lap.score(monitor))
    clearly = first.score(monitor) - best.score(monitor) > first.standard_error(monitor, val_images)
    return best if clearly else first


def finish(lap: Lap, index: DatasetIndex, out: Path, quiet: bool) -> Run:
    """Move the winner's run folder up into RUN, drop the race, and go on training from the winner's checkpoint
    (evaluation and report included); a run the race already finished only gets its report again, which now
    sees the leaderboard beside it."""
    folder = out / RACE_FOLDER / lap.name
    for entry in folder.iterdir():
        entry.rename(out / entry.name)
    shutil.rmtree(out / RACE_FOLDER)
    if not lap.finished:
        return api.resume(out, index, quiet=quiet)
    run = api.load(out)
    write_report(run)
    return run


def finish_race(laps: list[Lap], won: str, index: DatasetIndex, out: Path, quiet: bool, cfg: TrainConfig,
                reporter: Reporter) -> Run:
    """The winner alone (`finish`); with `ensemble` on, both finalists finish their runs and stay together as an
    ensemble when their averaged validation probabilities beat the winner's by the monitor (decision 0275)."""
    lap = next(lap for lap in laps if lap.name == won)
    if not cfg.ensemble:
        return finish(lap, index, out, quiet)
    names = [won, *(other.name for other in laps if other.name != won)]
    runs = [api.resume(out / RACE_FOLDER / name, index, quiet=quiet) for name in names]
    gain = ensemble_gain(runs, names, index, cfg.monitor)
    if not gain["better"]:
        reporter.log(f"ensemble: not kept, {gain['monitor']} {gain['ensemble'][gain['monitor']]:.4f} vs the "
                     f"winner's {gain['winner'][gain['monitor']]:.4f}")
        return finish(dataclasses.replace(lap, finished=True), index, out, quiet)  # its report sees the leaderboard
    (out / MEMBERS).mkdir(exist_ok=True)
    for name in names:
        (out / RACE_FOLDER / name).rename(out / MEMBERS / name)
    shutil.rmtree(out / RACE_FOLDER)
    reporter.log(f"ensemble: kept ({', '.join(names)}), {gain['monitor']} {gain['ensemble'][gain['monitor']]:.4f} "
                 f"vs the winner's {gain['winner'][gain['monitor']]:.4f}")
    ensemble = write_ensemble(out, [Run(out / MEMBERS / name) for name in names], names, gain)
    ensemble.evaluate(index)
    write_report(ensemble)
    return ensemble
