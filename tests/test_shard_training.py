"""Training from packed shards: fine-tuning streams them, and a crashed streamed run resumes to the same result."""

from __future__ import annotations

from pathlib import Path

import pytest

import transferkit.training.two_stage as two_stage
from transferkit import api
from transferkit.data.shards import pack
from transferkit.progress import Reporter
from transferkit.run import TensorBoardWriter


class Crash(Exception):
    pass


@pytest.fixture
def packed(dataset: Path, tmp_path: Path) -> Path:
    # small shards, so that the train split spans several and loader workers split them
    pack(dataset, tmp_path / "shards", shard_size_bytes=4000, reporter=Reporter(quiet=True))
    return tmp_path / "shards"


@pytest.fixture
def options(fast: dict) -> dict:
    return {**fast, "epochs_frozen": 2, "epochs_finetune": 2, "augment": "light", "unfreeze": "all",
            "checkpoint_every": 1, "patience": 0, "shuffle_buffer": 8}


def test_fine_tuning_streams_packed_shards_and_resumes_exactly(packed: Path, tmp_path: Path, options: dict,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    streamed = []
    original = two_stage.stream_loader

    def counting(*args, **kwargs):
        streamed.append(kwargs["epoch"])
        return original(*args, **kwargs)

    monkeypatch.setattr(two_stage, "stream_loader", counting)
    straight = api.train(packed, tmp_path / "straight", **options)
    assert set(streamed) == {1, 2}  # both fine-tuning epochs came from the stream
    rows = (tmp_path / "straight" / "history.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in rows[1:]] == ["frozen", "frozen", "finetune", "finetune"]

    calls = {"n": 0}
    step = TensorBoardWriter.step

    def crash_mid_finetune(self, log):  # 30 train images / 8: 4 batches per epoch; call 11 is fine-tune epoch 1
        step(self, log)
        calls["n"] += 1
        if calls["n"] == 11:
            raise Crash

    monkeypatch.setattr(TensorBoardWriter, "step", crash_mid_finetune)
    with pytest.raises(Crash):
        api.train(packed, tmp_path / "crashed", **options)
    monkeypatch.setattr(TensorBoardWriter, "step", step)
    resumed = api.resume(tmp_path / "crashed")
    assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], abs=1e-5)
    assert resumed.metrics["accuracy"] == straight.metrics["accuracy"]
