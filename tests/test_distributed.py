"""Several processes, one run: two CPU ranks (gloo) agree, rank 0 alone writes, and the result is a one-process
run's with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from transferkit.cli.launch import without_option
from transferkit.cli.main import run_cli
from transferkit.data.shards import pack
from transferkit.progress import Reporter
from transferkit.training.distributed import Ranks

pytestmark = pytest.mark.distributed

RANK_DIGEST = """
import hashlib, os, sys
from transferkit import api
from transferkit.training.callbacks import Callback

class RecordDigest(Callback):
    def after_fit(self, trainer):
        state = trainer.model.state_dict().values()
        weights = b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in state)
        with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.digest"), "w") as handle:
            handle.write(hashlib.sha256(weights).hexdigest())

api.train(sys.argv[2], sys.argv[3], quiet=True, backbone="test_efficientnet", weights=sys.argv[4], image_size=32,
          batch_size=int(sys.argv[5]), workers=0, epochs_frozen=2, head_fit="sgd", epochs_finetune=2, unfreeze="all",
          patience=0, callbacks=[RecordDigest()])
"""


def launch(script: Path, processes: int, *args: str) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args]
    if processes == 1:  # the plain process, as rank 0 of 1 for the script's file name
        command = [sys.executable, str(script), *args]
    subprocess.run(command, check=True, env={"RANK": "0", **os.environ}, capture_output=True, timeout=600)


def test_two_ranks_under_accelerate_agree_and_match_one_process(dataset: Path, tmp_path: Path,
                                                                  tiny_weights: str) -> None:
    script = tmp_path / "rank_digest.py"
    script.write_text(textwrap.dedent(RANK_DIGEST))
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    launch(script, 2, str(tmp_path / "two"), str(dataset), str(tmp_path / "two" / "run"), tiny_weights, "8")
    launch(script, 1, str(tmp_path / "one"), str(dataset), str(tmp_path / "one" / "run"), tiny_weights, "16")

    digests = {p.name: p.read_text() for p in (tmp_path / "two").glob("rank*.digest")}
    assert set(digests) == {"rank0.digest", "rank1.digest"}
    assert len(set(digests.values())) == 1  # every rank ends with the same weights
    two, one = (json.loads((tmp_path / name / "run" / "metrics.json").read_text()) for name in ("two", "one"))
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-4)  # 2 x 8 per process == 16 in one process
    assert two["accuracy"] == one["accuracy"]
    history = [(tmp_path / name / "run" / "history.csv").read_text().splitlines() for name in ("two", "one")]
    assert len(history[0]) == len(history[1]) == 1 + 4  # header + 2 frozen + 2 fine-tune epochs, written once
    # rank 0 alone wrote: one TensorBoard event file, no stray files from rank 1
    assert len(list((tmp_path / "two" / "run" / "tb").glob("events.*"))) == 1


def test_train_num_processes_runs_the_ranks_itself_on_streamed_shards(dataset: Path, tmp_path: Path,
                                                                      tiny_weights: str,
                                                                      capfd: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank streams its own shards while fine-tuning (and the same number of batches: DDP needs that). Without
    --out every rank writes the one default folder the launcher chose."""
    pack(dataset, tmp_path / "shards", shard_size_bytes=8000, reporter=Reporter(quiet=True))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "shards"
    code = run_cli(["train", str(tmp_path / "shards"), "--backbone", "test_efficientnet",
                    "--weights", tiny_weights, "--image-size", "32", "--batch-size", "8", "--workers", "0",
                    "--epochs-frozen", "1", "--epochs-finetune", "1", "--num-processes", "2"])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert "2 processes (gloo): global batch 16 = 8 per process x 2" in captured.out + captured.err
    assert (out / "metrics.json").is_file() and (out / "report.html").is_file()
    rows = (out / "history.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1] for row in rows] == ["frozen", "finetune"]
    assert [path.name for path in (tmp_path / "runs").iterdir()] == ["shards"]


def test_a_bad_input_in_the_ranks_is_one_line_and_exit_2(dataset: Path, tmp_path: Path, tiny_weights: str,
                                                         capfd: pytest.CaptureFixture) -> None:
    config = tmp_path / "sync.yaml"
    config.write_text("sync_bn: true\nepochs_finetune: 1\n")  # it applies to fine-tuning
    code = run_cli(["train", str(dataset), "--out", str(tmp_path / "run"), "--backbone", "test_efficientnet",
                    "--weights", tiny_weights, "--image-size", "32", "--workers", "0", "--config", str(config),
                    "--num-processes", "2", "--quiet"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["transferkit: error: sync_bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernel)"]
    assert not (tmp_path / "run" / "meta.json").exists()


def test_num_processes_checks_its_input_before_starting_anything(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    assert run_cli(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--num-processes", "2"]) == 2
    assert "path does not exist" in capsys.readouterr().err
    assert run_cli(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--num-processes", "2",
                    "--optimizer", "nope"]) == 2
    assert "optimizer must be one of" in capsys.readouterr().err


def test_global_batches_are_cut_into_one_piece_per_rank() -> None:
    order = torch.arange(10)
    pieces = []
    for rank in (0, 1):
        ranks = Ranks(rank, 2)
        padded = ranks.pad(order)
        assert len(padded) == 10
        pieces.append(torch.cat([ranks.piece(chunk) for chunk in padded.split(4 * 2)]).tolist())
    # global batch 1 = images 0-7: rank 0 takes 0-3, rank 1 takes 4-7; the last (8, 9) is split 1 + 1
    assert pieces == [[0, 1, 2, 3, 8], [4, 5, 6, 7, 9]]
    three = Ranks(0, 3)
    assert three.pad(torch.arange(7)).tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1]  # every rank steps as often
    assert Ranks(1, 3).mine(list("abcdefg")) == ["b", "e"]
    alone = Ranks()
    assert alone.gather_rows(torch.ones(3, 2)).shape == (3, 2) and not alone.distributed


def test_the_launcher_passes_every_argument_but_its_own() -> None:
    argv = ["train", "data", "--num-processes", "2", "--out", "r", "--num-processes=3", "--lr", "0.1"]
    assert without_option(argv, "--num-processes") == ["train", "data", "--out", "r", "--lr", "0.1"]
