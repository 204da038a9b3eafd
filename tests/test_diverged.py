"""Training that cannot give a usable model says so in one line and saves nothing that looks finished: a backbone
whose weights give NaN features, and a head whose every epoch diverged. A diverged epoch is never the one kept."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.errors import UserError
from transferkit.training.callbacks import Callback
from transferkit.training.state import BestKeeper, EpochLog


@pytest.fixture(scope="module")
def nan_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """test_efficientnet whose last convolution is NaN: a damaged --weights file."""
    state = timm.create_model("test_efficientnet", pretrained=False).state_dict()
    state = {k: torch.full_like(v, math.nan) if k.startswith("conv_head") else v.contiguous() for k, v in state.items()}
    path = tmp_path_factory.mktemp("nan") / "nan.safetensors"
    save_file(state, str(path))
    return str(path)


@pytest.mark.parametrize("engine", ["auto", "torch"])
def test_a_backbone_giving_nan_features_is_one_line(binary_dataset: Path, nan_weights: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], engine: str) -> None:
    out = tmp_path / "run"
    argv = ["train", str(binary_dataset), "--out", str(out), "--backbone", "test_efficientnet", "--weights",
            nan_weights, "--image-size", "32", "--workers", "0", "--no-cache", "--set", f"feature_engine={engine}",
            "--quiet"]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the backbone gives features that are not finite (NaN or infinite)" in err[0], err
    assert not (out / "meta.json").exists()


class PoisonHead(Callback):
    """Every optimizer step leaves the head's weights NaN, as a far too high learning rate does."""

    def after_batch(self, trainer, end) -> None:
        with torch.no_grad():
            for parameter in trainer.model.head.parameters():
                parameter.fill_(math.nan)


def test_a_head_that_diverged_every_epoch_is_refused_not_saved(binary_dataset: Path, tmp_path: Path,
                                                               fast: dict) -> None:
    with pytest.raises(UserError, match="training diverged: no epoch reached a finite val_loss; lower the"):
        api.train(binary_dataset, tmp_path / "run", callbacks=[PoisonHead()], **{**fast, "epochs_finetune": 0})
    assert not (tmp_path / "run" / "meta.json").exists()


def log(epoch: int, val_loss: float) -> EpochLog:
    return EpochLog(epoch, "frozen", 0.5, 0.5, val_loss, 0.5, 1e-3, 1.0)


def test_the_keeper_never_keeps_a_nan_epoch() -> None:
    keeper, head = BestKeeper("val_loss", patience=0), torch.nn.Linear(2, 1)
    keeper.update(log(1, math.nan), head)
    assert keeper.best is None and keeper.best_state is None
    keeper.update(log(2, 0.7), head)
    keeper.update(log(3, math.inf), head)
    assert keeper.best == 0.7 and keeper.best_epoch == ("frozen", 2)
