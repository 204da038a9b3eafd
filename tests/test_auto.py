"""`transferkit auto` and `lr-find`: the clearly better backbone wins and is trained into a complete run whose report
shows the leaderboard; probing then training computes each clean feature once; the range test suggests a sane rate;
bad input is one line and exit 2."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import make_class_folders
from transferkit.auto import lr_find, plot_lr_find
from transferkit.auto.plan import MAX_FINETUNE_EPOCHS, Speeds, Workload, plan_training, unfreeze_rule
from transferkit.auto.probe import Option, Score, pick
from transferkit.auto.range_test import best_rate
from transferkit.cli.main import run_cli
from transferkit.config import resolve_config

FAST = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def crippled_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """test_efficientnet_gn (as many parameters as test_efficientnet) with every tensor zeroed: constant features,
    nothing to transfer."""
    model = timm.create_model("test_efficientnet_gn", pretrained=False)
    path = tmp_path_factory.mktemp("crippled") / "zeroed.safetensors"
    save_file({k: torch.zeros_like(v).contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str, crippled_weights: str) -> dict:
    """One `auto` run over both candidates (the crippled one listed first), with its own feature cache."""
    root = tmp_path_factory.mktemp("auto")
    data = make_class_folders(root / "data", classes=3, per_class=16)
    config = root / "fast.yaml"
    config.write_text("augment: none\nepochs_frozen: 4\n")
    out, cache = root / "run", root / "cache"
    backbones = f"test_efficientnet_gn={crippled_weights},test_efficientnet={tiny_weights}"
    code, printed = run_and_capture(["auto", str(data), "--out", str(out), "--backbones", backbones, "--time-budget",
                                     "5", "--config", str(config), "--cache-dir", str(cache), "--json", *FAST])
    assert code == 0
    return {"data": data, "out": out, "cache": cache, "summary": json.loads(printed)}


def run_and_capture(argv: list[str]) -> tuple[int, str]:
    """Exit code and stdout of one command (pytest's capsys is function-scoped; the auto run is shared)."""
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = run_cli(argv)
    return code, stdout.getvalue()


def test_auto_picks_and_trains_the_clearly_better_backbone(auto_run: dict) -> None:
    summary, out = auto_run["summary"], auto_run["out"]
    best, worst = summary["leaderboard"]
    assert (best["backbone"], best["chosen"]) == ("test_efficientnet", True)
    assert (worst["backbone"], worst["chosen"]) == ("test_efficientnet_gn", False)
    assert best["probe_accuracy"] > worst["probe_accuracy"] + 0.3  # constant features score at chance (1/3)
    assert worst["probe_accuracy"] < 0.5
    assert summary["chosen"] == "test_efficientnet"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["backbone"] == "test_efficientnet" and meta["head"]["hidden"] == summary["head"]["hidden"]
    for name in ("model.safetensors", "metrics.json", "config.yaml", "history.csv", "auto.json"):
        assert (out / name).is_file(), name
    assert summary["metrics"]["accuracy"] == json.loads((out / "metrics.json").read_text())["accuracy"]


def test_run_folder_records_the_choices(auto_run: dict) -> None:
    summary, out = auto_run["summary"], auto_run["out"]
    with (out / "leaderboard.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    ranked = [(r["backbone"], r["chosen"]) for r in rows]
    assert ranked == [("test_efficientnet", "yes"), ("test_efficientnet_gn", "no")]
    assert int(rows[0]["params"]) == int(rows[1]["params"]) > 0  # equal size: only the probe separates them
    config = resolve_config(config_file=str(out / "config.yaml"))
    assert config.lr == pytest.approx(summary["lr"]["head"])
    assert config.unfreeze == summary["unfreeze"] == "1"  # fewer than 500 training images: the top block only
    assert config.epochs_finetune == summary["plan"]["epochs_finetune"] <= MAX_FINETUNE_EPOCHS
    assert json.loads((out / "auto.json").read_text())["chosen"] == "test_efficientnet"
    assert Image.open(out / "lr_find.png").size[0] > 100


def test_report_shows_the_leaderboard(auto_run: dict) -> None:
    html = (auto_run["out"] / "report.html").read_text()
    section = html[html.index('<section id="leaderboard">'):]
    section = section[: section.index("</section>")]
    assert section.index("test_efficientnet<") < section.index("test_efficientnet_gn")  # best first
    assert "<b>test_efficientnet</b>" in section  # the chosen one is marked


def test_probing_then_training_computes_each_clean_feature_once(auto_run: dict) -> None:
    """The probe fills the cache with every train+val image's clean view; training finds them all there."""
    spaces = list((auto_run["cache"] / "features").iterdir())
    assert len(spaces) == 2  # one feature space per candidate backbone, clean view only (augment: none)
    for space in spaces:
        assert len(list(space.glob("*.npy"))) == 1, space


def test_lr_find_from_a_runs_config(auto_run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    plot = auto_run["out"].parent / "from_run.png"
    assert run_cli(["lr-find", str(auto_run["out"] / "config.yaml"), "--workers", "0", "--quiet", "--json",
                    "--out", str(plot)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"suggested_lr", "lrs", "losses"}
    assert len(result["lrs"]) == len(result["losses"]) > 10
    Image.open(plot).verify()


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three overlapping classes of positive, pooled-feature-like vectors: a linear head trained with AdamW does
    best around 1e-3..1e-1 (the range test's sane range is wider)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 300)
    centres = rng.random((3, 128)) * 2
    return np.abs(centres[labels] + rng.normal(scale=1.0, size=(300, 128))).astype(np.float32), labels


def test_lr_find_suggests_a_sane_rate_and_records_the_curve(tmp_path: Path) -> None:
    features, labels = blobs()
    result = lr_find(features, labels, 3, resolve_config())
    assert 1e-4 <= result.suggested_lr <= 1.0
    assert result.lrs[0] == pytest.approx(1e-7)
    ratios = np.diff(np.log(result.lrs))
    assert np.allclose(ratios, ratios[0]) and ratios[0] > 0  # exponentially increasing
    assert len(result.losses) == len(result.lrs) <= 100
    assert min(result.losses) < result.losses[0] * 0.7  # it learned something along the way
    assert result.suggested_lr in result.lrs and math.isfinite(result.seconds_per_image)
    plot_lr_find(result, tmp_path / "lr.png")
    with Image.open(tmp_path / "lr.png") as image:
        image.load()
        assert image.format == "PNG" and image.size[0] > 100


def test_lr_find_stops_when_the_loss_explodes() -> None:
    features, labels = blobs()
    result = lr_find(features * 100, labels, 3, resolve_config(optimizer="sgd"))
    assert len(result.lrs) < 100 and result.lrs[-1] < 10


def test_best_rate_backs_off_from_a_suggestion_that_is_too_fast() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    features = (rng.random((3, 128)) * 2)[labels] + rng.normal(scale=3.0, size=(300, 128))  # overlapping classes
    features = features.astype(np.float32)
    cfg = resolve_config(epochs_frozen=10)
    chosen, losses = best_rate(features, labels, 3, cfg, suggestion=10.0)  # Adam at 10 overshoots and overfits
    assert len(losses) == 5 and chosen == min(losses, key=losses.get)
    assert chosen < 10.0 and losses[chosen] < losses[10.0]
    again, _ = best_rate(features, labels, 3, cfg, suggestion=10.0)
    assert again == chosen  # seeded: the same data gives the same choice


def test_lr_find_command_on_data(dataset: Path, tiny_weights: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "plot.png"
    assert run_cli(["lr-find", str(dataset), "--backbone", "test_efficientnet", "--weights", tiny_weights,
                    "--out", str(plot), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "suggested learning rate" in printed and str(plot) in printed
    Image.open(plot).verify()


def option(name: str, mean: float, sd: float, cost: float) -> Option:
    return Option(name, Score(mean, sd, 5), cost)


def test_pick_prefers_the_cheaper_only_within_a_tie() -> None:
    big = option("big", 0.90, 0.03, 20e6)
    assert pick([big, option("small", 0.89, 0.01, 3e6)]).name == "small"  # within one sd of the best
    assert pick([big, option("small", 0.85, 0.01, 3e6)]).name == "big"  # clearly worse
    noisy = option("noisy", 0.90, 0.20, 20e6)  # a huge sd does not make a much worse backbone a tie
    assert pick([noisy, option("small", 0.80, 0.01, 3e6)]).name == "noisy"


def test_unfreeze_grows_with_the_data() -> None:
    assert [unfreeze_rule(n, 8) for n in (100, 1000, 5000, 20000, 100000)] == ["1", "2", "3", "5", "all"]
    assert unfreeze_rule(20000, 4) == "4"  # never more blocks than the backbone has


def test_plan_fits_the_budget() -> None:
    config = resolve_config(augment="light", feature_views=3, epochs_frozen=10)
    work = Workload(train=1000, val=200, evaluated=200, uncached=0)
    speeds = Speeds(inference=0.01, finetune=0.05, head=1e-4)
    roomy = plan_training(3600, work, speeds, config)
    assert roomy.epochs_finetune == MAX_FINETUNE_EPOCHS and roomy.feature_views == 3
    tight = plan_training(200, work, speeds, config)
    assert 0 < tight.epochs_finetune < MAX_FINETUNE_EPOCHS and tight.estimated_seconds <= 200
    tiny = plan_training(5, work, speeds, config)
    assert (tiny.epochs_finetune, tiny.feature_views) == (0, 1)  # the minimum: clean view, head only


@pytest.mark.parametrize(("args", "message"), [
    (["--backbones", "no_such_net"], "unknown backbone 'no_such_net'"),
    (["--time-budget", "0"], "--time-budget must be more than 0"),
    (["--time-budget", "-3"], "--time-budget must be more than 0"),
    (["--backbones", "test_efficientnet,test_resnet", "--weights", "w.safetensors"], "--weights needs exactly one"),
    (["--backbones", "test_efficientnet=missing.safetensors"], "weights file not found"),
    (["--backbones", "test_efficientnet,test_efficientnet"], "more than once"),
])
def test_auto_bad_input(args: list[str], message: str, dataset: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["auto", str(dataset), "--out", str(tmp_path / "run"), *args, *FAST]) == 2
    assert_one_line(capsys, message)
    assert not (tmp_path / "run").exists()


def test_auto_without_any_weights(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("transferkit.auto.search.has_offline_weights", lambda spec: False)
    assert run_cli(["auto", str(dataset), "--out", str(tmp_path / "run"), *FAST]) == 2
    assert_one_line(capsys, "no backbone has ImageNet weights available")


def test_auto_and_lr_find_on_missing_data(tmp_path: Path, tiny_weights: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nowhere")
    assert run_cli(["auto", missing, "--out", str(tmp_path / "run"), "--backbones",
                    f"test_efficientnet={tiny_weights}", *FAST]) == 2
    assert_one_line(capsys, "nowhere")
    assert run_cli(["lr-find", missing, "--backbone", "test_efficientnet", "--weights", tiny_weights, *FAST]) == 2
    assert_one_line(capsys, "nowhere")


def assert_one_line(capsys: pytest.CaptureFixture[str], message: str) -> None:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transferkit: error:") and message in lines[0], captured.err
