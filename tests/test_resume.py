"""Resume after a crash: a run interrupted anywhere and resumed ends as the uninterrupted run with the same seed."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.data.loader import seeded
from transferkit.training.callbacks import Callback
from transferkit.training.checkpoint import CHECKPOINT


class Crash(Exception):
    """Stands for the process dying: nothing after it runs."""


@pytest.fixture
def resumable(fast: dict) -> dict:
    # light augmentation: stage 2's augmented batches must replay identically too
    return {**fast, "epochs_frozen": 3, "epochs_finetune": 2, "augment": "light", "unfreeze": "all",
            "checkpoint_every": 1, "patience": 0}


class RaiseAtBatch(Callback):
    """Raises `error` at the `calls`-th training batch (counted over both stages), after its checkpoint."""

    order = 25

    def __init__(self, calls: int, error: type[BaseException]) -> None:
        self.calls, self.error, self.seen = calls, error, 0

    def after_batch(self, trainer, batch) -> None:
        self.seen += 1
        if self.seen == self.calls:
            raise self.error


def history(run_folder: Path) -> list[list[str]]:
    """history.csv without the seconds column (wall time differs between runs)."""
    rows = [line.split(",") for line in (run_folder / "history.csv").read_text().splitlines()]
    drop = rows[0].index("seconds")
    return [row[:drop] + row[drop + 1:] for row in rows]


# dataset: 36 images, 60% train at batch 8 -> 3 batches per epoch; stage 1 is calls 1-9, stage 2 calls 10-15
@pytest.mark.parametrize("calls", [2, 9, 11])
def test_resumed_run_ends_as_the_uninterrupted_one(dataset: Path, tmp_path: Path, resumable: dict,
                                                   monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    straight = api.train(dataset, tmp_path / "straight", **resumable)
    with pytest.raises(Crash):
        api.train(dataset, tmp_path / "crashed", callbacks=[RaiseAtBatch(calls, Crash)], **resumable)
    assert (tmp_path / "crashed" / CHECKPOINT).is_file() and not (tmp_path / "crashed" / "meta.json").exists()
    (tmp_path / "crashed" / f".{CHECKPOINT}.x1y2z3.tmp").write_bytes(b"")  # what kill -9 mid-write leaves
    resumed = api.resume(tmp_path / "crashed")
    assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], abs=1e-5)
    assert resumed.metrics["accuracy"] == straight.metrics["accuracy"]
    assert history(tmp_path / "crashed") == history(tmp_path / "straight")  # no epoch lost or repeated
    assert not (tmp_path / "crashed" / CHECKPOINT).exists()  # the finished run drops it
    assert not list((tmp_path / "crashed").glob(".*.tmp"))  # and any half-written file


def test_a_run_begun_before_max_pooling_resumes_average_pooled(dataset: Path, tmp_path: Path, resumable: dict
                                                                ) -> None:
    straight = api.train(dataset, tmp_path / "straight", **{**resumable, "pool": "avg"})
    with pytest.raises(Crash):
        api.train(dataset, tmp_path / "old", callbacks=[RaiseAtBatch(11, Crash)], **{**resumable, "pool": "avg"})
    config = tmp_path / "old" / "config.yaml"  # as a run from before decision 0298 wrote it: no pool key
    config.write_text("".join(line for line in config.read_text().splitlines(True) if not line.startswith("pool:")))
    resumed = api.resume(tmp_path / "old")
    assert json.loads((tmp_path / "old" / "meta.json").read_text())["global_pool"] == "avg"
    assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], abs=1e-5)


def test_resume_after_ctrl_c_continues_training(dataset: Path, tmp_path: Path, resumable: dict,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    straight = api.train(dataset, tmp_path / "straight", **resumable)
    with pytest.raises(KeyboardInterrupt):
        api.train(dataset, tmp_path / "stopped", callbacks=[RaiseAtBatch(5, KeyboardInterrupt)], **resumable)
    assert json.loads((tmp_path / "stopped" / "meta.json").read_text())["interrupted"]
    resumed = api.resume(tmp_path / "stopped")
    assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], abs=1e-5)
    assert not resumed.meta.get("interrupted")


def test_resume_of_a_finished_run_changes_nothing(dataset: Path, tmp_path: Path, resumable: dict) -> None:
    run = api.train(dataset, tmp_path / "done", **resumable)
    before = (tmp_path / "done" / "model.safetensors").read_bytes()
    assert api.resume(tmp_path / "done").metrics == run.metrics
    assert (tmp_path / "done" / "model.safetensors").read_bytes() == before


def test_a_half_written_or_foreign_checkpoint_is_never_loaded(dataset: Path, tmp_path: Path, resumable: dict,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(Crash):
        api.train(dataset, tmp_path / "run", callbacks=[RaiseAtBatch(4, Crash)], **resumable)
    checkpoint = tmp_path / "run" / CHECKPOINT
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])  # as a torn write would
    assert run_cli(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_resume_refuses_bad_requests(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no run to resume" in capsys.readouterr().err
    assert run_cli(["train", "--resume", str(tmp_path), "--lr", "0.1"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert run_cli(["train", "--resume", str(tmp_path), "--lr", "0.1", "--set", "mixup=0.2", "--overwrite"]) == 2
    assert "drop --mixup, --lr, --overwrite" in capsys.readouterr().err
    assert run_cli(["train"]) == 2
    assert "train needs DATA (or --resume RUN)" in capsys.readouterr().err
    assert run_cli(["train", str(tmp_path / "moved"), "--resume", str(tmp_path / "nothing")]) == 2
    assert "path does not exist" in capsys.readouterr().err  # checked even before the run is looked at


def test_resume_refuses_changed_data(dataset: Path, tmp_path: Path, resumable: dict,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(Crash):
        api.train(dataset, tmp_path / "run", callbacks=[RaiseAtBatch(4, Crash)], **resumable)
    next(dataset.glob("class_0/*.png")).unlink()
    assert run_cli(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "start a new run" in capsys.readouterr().err


def test_full_disk_while_checkpointing_is_one_line_and_no_finished_run(
        dataset: Path, tmp_path: Path, resumable: dict, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    import errno

    import torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    args = ["train", str(dataset), "--out", str(tmp_path / "run"), "--backbone", resumable["backbone"],
            "--weights", resumable["weights"], "--image-size", "32", "--workers", "0", "--epochs-finetune", "1",
            "--quiet"]
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "meta.json").exists()


def test_full_disk_when_saving_the_model_then_resume_finishes_the_run(
        dataset: Path, tmp_path: Path, resumable: dict, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    import errno

    import transferkit.runs.files

    straight = api.train(dataset, tmp_path / "straight", **resumable)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(transferkit.runs.files, "save_file", full)
    args = ["train", str(dataset), "--out", str(tmp_path / "run"), "--backbone", resumable["backbone"],
            "--weights", resumable["weights"], "--image-size", "32", "--batch-size", "8", "--workers", "0",
            "--epochs-frozen", "3", "--head-fit", "sgd", "--epochs-finetune", "2", "--unfreeze", "all",
            "--checkpoint-every", "1", "--patience", "0", "--quiet"]
    assert run_cli(args) == 2
    assert "cannot write" in capsys.readouterr().err and not (tmp_path / "run" / "meta.json").exists()
    monkeypatch.undo()
    assert run_cli(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0  # the space is back
    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert resumed["loss"] == pytest.approx(straight.metrics["loss"], abs=1e-5)


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from transferkit.cli.main import main; main()", *args]


def wait_for_checkpoints(process: subprocess.Popen, checkpoint: Path, count: int, timeout: float = 300) -> bool:
    """Poll until the run has written its checkpoint `count` times (each atomic write shows a new inode or mtime;
    inodes alone are reused); False if the process ended first."""
    writes: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    while len(writes) < count and process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            status = checkpoint.stat()
            if not writes or writes[-1] != (status.st_ino, status.st_mtime_ns):
                writes.append((status.st_ino, status.st_mtime_ns))
        time.sleep(0.001)
    return len(writes) >= count


def test_kill_9_after_observed_checkpoints_then_resume(dataset: Path, tmp_path: Path, resumable: dict) -> None:
    """SIGKILL a real training process right after it has written its k-th checkpoint (k differs per round, in both
    stages), resume it, and get the uninterrupted run's metrics."""
    options = ["--backbone", resumable["backbone"], "--weights", resumable["weights"], "--image-size", "32",
               "--batch-size", "8", "--workers", "0", "--epochs-frozen", "3", "--head-fit", "sgd",
               "--epochs-finetune", "2", "--augment", "light", "--unfreeze", "all", "--checkpoint-every", "1",
               "--patience", "0", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run(cli_command("train", str(dataset), "--out", str(tmp_path / "straight"), *options),
                   check=True, env=env, capture_output=True)
    expected = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    for writes in (2, 7, 14):  # of ~20: stage 1 early and late, stage 2 (a write per batch and per epoch)
        out = tmp_path / f"killed-{writes}"
        process = subprocess.Popen(cli_command("train", str(dataset), "--out", str(out), *options), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        observed = wait_for_checkpoints(process, out / CHECKPOINT, writes)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert observed, f"the run never wrote {writes} checkpoints"
        assert not (out / "meta.json").exists(), "the kill came after the run had finished"
        subprocess.run(cli_command("train", "--resume", str(out), "--quiet"), check=True, env=env,
                       capture_output=True)
        got = json.loads((out / "metrics.json").read_text())
        assert got["accuracy"] == expected["accuracy"], writes
        assert got["loss"] == pytest.approx(expected["loss"], abs=1e-5), writes


def test_seeded_draws_repeat_inside_and_leave_the_outside_streams_free_of_the_seed() -> None:
    def draws() -> tuple[float, float, float]:
        return np.random.rand(), random.random(), torch.rand(1).item()

    outside = []
    for inner_seed in (7, 8):
        np.random.seed(0), random.seed(0), torch.manual_seed(0)
        with seeded(inner_seed):
            inside = draws()
        with seeded(inner_seed):
            assert draws() == inside  # the same seed, the same augmentation
        outside.append(draws())
    assert outside[0] == outside[1]  # what follows a seeded block does not depend on its seed
