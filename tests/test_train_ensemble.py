"""`train --backbone a,b` (decision 0297): one run per backbone on the same split, kept as their average; an
interrupted ensemble resumes member by member; bad lists fail in one line before anything trains."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.conftest import make_class_folders
from tests.test_cli import fails_with
from tests.test_multilabel import multilabel_csv
from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.runs.ensemble import Ensemble
from transferkit.runs.run import Run
from transferkit.training.callbacks import PauseAfter

OPTIONS = dict(image_size=32, batch_size=8, workers=0, epochs_frozen=3, epochs_finetune=2, augment="none",
               test_split=0.2, quiet=True)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str) -> str:
    """Two tiny architectures, each with its own seeded random 'ImageNet' weights file."""
    torch.manual_seed(1)
    resnet = tmp_path_factory.mktemp("resnet") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(resnet))
    return f"test_efficientnet={tiny_weights},test_resnet={resnet}"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("data") / "images", classes=3, per_class=12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data: Path, backbones: str) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "run"
    assert isinstance(api.train(data, out, backbone=backbones, **OPTIONS), Ensemble)
    return out


def test_several_backbones_train_one_run_each_on_one_split_and_keep_their_average(trained: Path, data: Path) -> None:
    meta = json.loads((trained / "meta.json").read_text())
    assert [m["path"] for m in meta["ensemble"]["members"]] == ["members/test_efficientnet", "members/test_resnet"]
    members = [Run(trained / "members" / name) for name in ("test_efficientnet", "test_resnet")]
    assert [m.meta["backbone"] for m in members] == ["test_efficientnet", "test_resnet"]
    split = json.loads((trained / "split.json").read_text())
    assert all(json.loads((m.path / "split.json").read_text()) == split for m in members)
    paths = split["test"]
    ensemble = api.load(trained)
    np.testing.assert_allclose(ensemble.probabilities(paths), np.mean([m.probabilities(paths) for m in members], 0),
                               atol=1e-6)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == len(paths)
    # evaluated through each member's feature engine and cache: the probabilities eager PyTorch gives
    with (trained / "predictions.csv").open(newline="") as handle:
        rows = {row["path"]: [float(row[f"p:{c}"]) for c in ensemble.classes] for row in csv.DictReader(handle)}
    np.testing.assert_allclose([rows[p] for p in paths], ensemble.probabilities(paths), atol=1e-4)
    assert set(meta["ensemble"]["gain"]["members"]) == {"test_efficientnet", "test_resnet"}
    html = (trained / "report.html").read_text()
    assert 'id="ensemble"' in html and "each member&#39;s training is in its own report" in html
    verdict = "beat" if meta["ensemble"]["gain"]["better"] else "did not beat"
    assert f"the average {verdict} the first member alone" in " ".join(html.split())


def test_an_interrupted_ensemble_resumes_member_by_member_to_the_same_result(
        tmp_path: Path, data: Path, backbones: str, trained: Path) -> None:
    out = tmp_path / "run"
    assert api.train(data, out, backbone=backbones, callbacks=[PauseAfter(1)], **OPTIONS) is None
    assert not (out / "meta.json").exists() and not (out / "members" / "test_resnet").exists()
    resumed = api.resume(out, quiet=True)
    assert isinstance(resumed, Ensemble)
    paths = json.loads((out / "split.json").read_text())["test"]
    np.testing.assert_allclose(resumed.probabilities(paths), api.load(trained).probabilities(paths), atol=1e-5)


@pytest.mark.parametrize("flags, fragment", [
    (["--backbone", "test_efficientnet,test_efficientnet"], "several different ones"),
    (["--backbone", "test_efficientnet,"], "several different ones"),
    (["--backbone", "test_efficientnet,test_resnet", "--weights", "w.safetensors"], "NAME=FILE"),
    (["--backbone", "test_efficientnet,no_such_net_xyz"], "unknown backbone 'no_such_net_xyz'"),
    (["--backbone", "test_efficientnet,test_resnet=missing.safetensors"], "weights file not found: missing"),
])
def test_a_bad_list_of_backbones_fails_in_one_line_before_anything_trains(
        capsys: pytest.CaptureFixture, tmp_path: Path, data: Path, flags: list[str], fragment: str) -> None:
    fails_with(capsys, ["train", str(data), "--out", str(tmp_path / "run"), *flags], fragment)
    assert not (tmp_path / "run").exists()


def test_commands_of_one_backbone_refuse_a_list_in_one_line(capsys: pytest.CaptureFixture, data: Path) -> None:
    fails_with(capsys, ["lr-find", str(data), "--backbone", "test_efficientnet,test_resnet"], "only train takes a list")


def test_the_accurate_recipe_averages_lite0_and_lite2_from_their_offline_weights(
        capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "data", classes=2, per_class=8)
    code = run_cli(["train", str(data), "--out", str(tmp_path / "run"), "--recipe", "accurate", "--workers", "0",
                    "--quiet", "--json"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert [m["backbone"] for m in meta["ensemble"]["members"]] == ["tf_efficientnet_lite0", "tf_efficientnet_lite2"]
    for member in ("tf_efficientnet_lite0", "tf_efficientnet_lite2"):
        kept = json.loads((tmp_path / "run" / "members" / member / "meta.json").read_text())
        assert kept["weights_source"].startswith("offline:") and kept["kept"]["stage"] == "frozen"


def test_an_ensemble_of_multilabel_data_is_refused_in_one_line(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                                  backbones: str) -> None:
    data = multilabel_csv(tmp_path / "data", per_combination=3)
    fails_with(capsys, ["train", str(data), "--out", str(tmp_path / "run"), "--backbone", backbones],
               "needs one label per image")
    assert not (tmp_path / "run").exists()



def test_a_two_class_ensemble_records_the_operating_point_it_decides_at(tmp_path: Path, backbones: str) -> None:
    data = make_class_folders(tmp_path / "data", classes=2, per_class=12)
    ensemble = api.train(data, tmp_path / "run", backbone=backbones, operating_point="balanced",
                         **{**OPTIONS, "epochs_finetune": 0})
    members = [json.loads((tmp_path / "run" / "members" / n / "meta.json").read_text())
               for n in ("test_efficientnet", "test_resnet")]
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["operating_point"] == "balanced" and ensemble.metrics["operating_point"] == "balanced"
    assert meta["threshold"] == pytest.approx(np.mean([m["threshold"] for m in members]))
