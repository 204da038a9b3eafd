"""Training from packed shards: fine-tuning streams them, and a crashed streamed run resumes to the same result."""

from __future__ import annotations

from pathlib import Path

import pytest

import transferkit.training.two_stage as two_stage
from tests.test_resume import Crash, RaiseAtBatch
from transferkit import api
from transferkit.data.shards import pack
from transferkit.progress import Reporter


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

    monkeypatch.undo()
    # 30 train images / 8: 4 batches per epoch; batch 11 is fine-tune epoch 1
    with pytest.raises(Crash):
        api.train(packed, tmp_path / "crashed", callbacks=[RaiseAtBatch(11, Crash)], **options)
    resumed = api.resume(tmp_path / "crashed")
    assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], abs=1e-5)
    assert resumed.metrics["accuracy"] == straight.metrics["accuracy"]
