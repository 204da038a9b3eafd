"""RUN/tb: TensorBoard events read back with tensorboard's own reader agree with history.csv, step by step and epoch
by epoch, for both stages, and are on disk even when training is interrupted."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from transferkit import api
from transferkit.runs.files import read_history
from transferkit.training.callbacks import Callback

STAGES = ("frozen", "finetune")


EPOCH_TAGS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "lr")


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder / "tb"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def event_writer_threads() -> int:
    """Live TensorBoard writer threads: one per SummaryWriter until it is closed."""
    return sum(type(thread).__name__ == "_AsyncWriterThread" for thread in threading.enumerate())


def batch_sizes(n_train: int, batch_size: int) -> list[int]:
    return [min(batch_size, n_train - start) for start in range(0, n_train, batch_size)]


def test_events_match_history_per_step_and_per_epoch(dataset: Path, tmp_path: Path, fast: dict) -> None:
    stale = tmp_path / "run" / "tb" / "events.out.tfevents.1.crashed"  # a crashed run's folder (no meta.json) is reused
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    run = api.train(dataset, tmp_path / "run", **fast)
    assert not stale.exists() and len(list((run.path / "tb").iterdir())) == 1
    logged = scalars(run.path)
    assert set(logged) == {f"{stage}/step/{tag}" for stage in STAGES for tag in ("loss", "acc", "lr")} | {
        f"{stage}/epoch/{tag}" for stage in STAGES for tag in EPOCH_TAGS}
    history = read_history(run.path / "history.csv")
    config = yaml.safe_load((run.path / "config.yaml").read_text())
    sizes = batch_sizes(len(json.loads((run.path / "split.json").read_text())["train"]), fast["batch_size"])
    first_lr = {"frozen": config["lr"], "finetune": config["finetune_lr"]}
    for stage in STAGES:
        rows = [h for h in history if h["stage"] == stage]
        assert len(rows) == fast[f"epochs_{stage}"]
        for tag in EPOCH_TAGS:
            assert logged[f"{stage}/epoch/{tag}"] == [(int(h["epoch"]), pytest.approx(h[tag], rel=1e-5, abs=1e-7))
                                                     for h in rows]
        steps = logged[f"{stage}/step/loss"]
        assert [step for step, _ in steps] == list(range(1, len(rows) * len(sizes) + 1))
        assert logged[f"{stage}/step/lr"][0][1] == pytest.approx(first_lr[stage])
        for epoch, row in enumerate(rows):
            # The epoch's training loss and accuracy are its steps' values weighted by batch size.
            epoch_steps = slice(epoch * len(sizes), (epoch + 1) * len(sizes))
            for step_tag, epoch_tag in (("loss", "train_loss"), ("acc", "train_acc")):
                values = [value for _, value in logged[f"{stage}/step/{step_tag}"][epoch_steps]]
                weighted = sum(v * n for v, n in zip(values, sizes, strict=True)) / sum(sizes)
                assert weighted == pytest.approx(row[epoch_tag], rel=1e-5)


class InterruptBeforeEpochLog(Callback):
    """Ctrl-C as epoch 2 ends, before any other callback has logged it."""

    order = -1

    def after_epoch(self, trainer, log) -> None:
        if log.epoch == 2:
            raise KeyboardInterrupt


def test_writer_is_closed_and_events_kept_when_training_is_interrupted(dataset: Path, tmp_path: Path,
                                                                       fast: dict) -> None:
    writers_before = event_writer_threads()
    with pytest.raises(KeyboardInterrupt):
        api.train(dataset, tmp_path / "run", callbacks=[InterruptBeforeEpochLog()], **fast)
    assert event_writer_threads() == writers_before  # closed: its queue drained to disk, its thread ended
    logged = scalars(tmp_path / "run")
    # Epoch 1 was logged; epoch 2's batches ran before its end was interrupted.
    assert [step for step, _ in logged["frozen/epoch/val_loss"]] == [1]
    n_train = len(json.loads((tmp_path / "run" / "split.json").read_text())["train"])
    assert len(logged["frozen/step/loss"]) == 2 * math.ceil(n_train / fast["batch_size"])
    assert not any(tag.startswith("finetune/") for tag in logged)
