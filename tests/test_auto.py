"""`transferkit auto` and `lr-find`: the clearly better backbone wins and is trained into a complete run whose report
shows the leaderboard; probing then training computes each clean feature once; the range test suggests a sane rate;
bad input is one line and exit 2."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_class_folders
from transferkit.auto import lr_find, orchestrate, plot_lr_find, probe
from transferkit.auto.plan import (
    MAX_FINETUNE_EPOCHS,
    SAFETY,
    Speeds,
    Workload,
    fixed_seconds,
    plan_training,
    unfreeze_rule,
)
from transferkit.auto.probe import HIDDEN_UNITS, Option, Score, choose_head, cv_accuracy, linear_probe, pick
from transferkit.auto.range_test import best_rate
from transferkit.cli.main import run_cli
from transferkit.config import resolve_config

FAST = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--quiet"]


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
    head = summary["head"]  # the linear head's score is the winner's probe, reused
    assert head["linear"]["accuracy"] == float(rows[0]["probe_accuracy"])
    assert "cap" in head["note"] and head["seconds"] >= 0
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


def test_lr_find_plot_names_the_backbone_and_the_rate_used() -> None:
    from transferkit.auto.range_test import lr_find_figure

    features, labels = blobs()
    result = lr_find(features, labels, 3, resolve_config())
    used = result.suggested_lr / 10
    ax = lr_find_figure(result, used, "tf_efficientnet_lite0").axes[0]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend[1].startswith(f"used {used:.2e}") and legend[0].startswith(f"suggested {result.suggested_lr:.2e}")
    assert ax.get_title().endswith(": tf_efficientnet_lite0")
    assert any(line.get_xdata()[0] == used for line in ax.get_lines())


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


def test_a_tie_goes_to_the_preferred_backbone_when_it_is_tied() -> None:
    best, cheap = option("best", 0.70, 0.02, 5e6), option("cheap", 0.69, 0.03, 2e6)
    default = option("default", 0.695, 0.02, 3e6)
    assert pick([best, cheap, default], preferred="default").name == "default"
    assert pick([best, cheap, default]).name == "cheap"
    behind = option("default", 0.60, 0.02, 3e6)  # not tied: the preference does not rescue it
    assert pick([best, cheap, behind], preferred="default").name == "cheap"


def test_unfreeze_grows_with_the_data() -> None:
    assert [unfreeze_rule(n, 8) for n in (100, 1000, 5000, 20000, 100000)] == ["1", "3", "3", "5", "all"]
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


# ELPV with Lite1 as measured (1,706 train / 394 val / 525 test images, 100 clean features not probed yet)
ELPV = Workload(train=1706, val=394, evaluated=525, uncached=100)
ELPV_SPEEDS = Speeds(inference=0.021, finetune=0.031, head=6e-5)


def test_plan_spends_the_budget_on_fine_tuning_before_augmented_views() -> None:
    """The 10-minute ELPV run had ~385 s left after probing: the old plan bought 2 augmented views (~90 s) and 3
    fine-tuning epochs; fine-tuning now comes first, the views only from what MAX_FINETUNE_EPOCHS leave."""
    config = resolve_config(augment="light", feature_views=3)
    epoch = SAFETY * (ELPV.train * ELPV_SPEEDS.finetune + ELPV.val * ELPV_SPEEDS.inference)
    minimum = fixed_seconds(ELPV, ELPV_SPEEDS, config, 1)
    plan = plan_training(385, ELPV, ELPV_SPEEDS, config)
    assert plan.feature_views == 1 and plan.epochs_finetune == math.floor((385 - minimum) / epoch) >= 4
    assert plan.estimated_seconds <= 385
    for seconds in range(60, 3000, 20):  # views > 1 only once fine-tuning has all its epochs
        plan = plan_training(seconds, ELPV, ELPV_SPEEDS, config)
        assert plan.feature_views == 1 or plan.epochs_finetune == MAX_FINETUNE_EPOCHS, seconds
        assert plan.estimated_seconds <= seconds or plan.epochs_finetune == 0, seconds
    full = minimum + MAX_FINETUNE_EPOCHS * epoch
    views = [fixed_seconds(ELPV, ELPV_SPEEDS, config, v) - minimum for v in (2, 3)]
    assert plan_training(full + views[0] - 1, ELPV, ELPV_SPEEDS, config).feature_views == 1
    assert plan_training(full + views[0] + 1, ELPV, ELPV_SPEEDS, config).feature_views == 2
    assert plan_training(full + views[1] + 1, ELPV, ELPV_SPEEDS, config).feature_views == 3
    assert plan_training(10**6, ELPV, ELPV_SPEEDS, resolve_config(augment="none")).feature_views == 1


def test_head_epochs_are_costed_over_every_view() -> None:
    config = resolve_config(epochs_frozen=30)
    slow_head = Speeds(inference=0.0, finetune=0.0, head=1e-3)
    one, three = (fixed_seconds(ELPV, slow_head, config, views) for views in (1, 3))
    assert three - one == pytest.approx(SAFETY * 30 * ELPV.train * 2 * 1e-3)


def xor(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes no linear head separates (the sign of x0 * x1), which one hidden layer does."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(-1, 1, (n, 2))
    labels = (points[:, 0] * points[:, 1] > 0).astype(int)
    return np.hstack([points, np.ones((n, 1))]).astype(np.float32), labels  # a constant: L2 rows keep the signs


def test_head_choice_reuses_the_linear_probe_and_takes_a_clearly_better_mlp() -> None:
    features, labels = xor()
    linear = cv_accuracy(linear_probe(), features, labels, 0)
    choice = choose_head(features, labels, 0, linear, cap=120)
    assert choice.scores["linear"] is linear  # the backbone probe's score, not computed again
    assert choice.scores["mlp"].folds == linear.folds == 5
    assert choice.scores["mlp"].mean > linear.mean + 0.2 and choice.hidden == [HIDDEN_UNITS]
    assert choice.to_json()["mlp"]["accuracy"] == round(choice.scores["mlp"].mean, 4)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class SlowPerfectMLP:
    """Scores 1.0 (so it would win any comparison) and costs 10 fake seconds per full fit of MLP_MAX_ITER."""

    def __init__(self, clock: FakeClock, max_iter: int) -> None:
        self.clock, self.max_iter = clock, max_iter

    def fit(self, features: np.ndarray, labels: np.ndarray) -> SlowPerfectMLP:
        self.clock.now += 10.0 * self.max_iter / probe.MLP_MAX_ITER
        return self

    def score(self, features: np.ndarray, labels: np.ndarray) -> float:
        return 1.0


@pytest.mark.parametrize(("cap", "fits", "chosen"), [(25.0, 2, []), (0.0, 0, []), (60.0, 5, [HIDDEN_UNITS])])
def test_head_choice_respects_its_time_cap(cap: float, fits: int, chosen: list[int],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibration (1/3 s) estimates a 10 s fold; with 25 s only two folds fit before the next would pass the cap,
    so the MLP is not compared however good it is; with 0 s nothing is even calibrated; 60 s fits all five."""
    clock, fitted = FakeClock(), []

    def slow_mlp(seed: int, max_iter: int = probe.MLP_MAX_ITER) -> SlowPerfectMLP:
        fitted.append(max_iter)
        return SlowPerfectMLP(clock, max_iter)

    monkeypatch.setattr(probe, "time", clock)
    monkeypatch.setattr(probe, "mlp_probe", slow_mlp)
    features, labels = xor(100)
    linear = Score(0.6, 0.05, 5)
    choice = choose_head(features, labels, 0, linear, cap)
    assert choice.hidden == chosen and choice.seconds <= cap
    assert fitted == ([probe.CALIBRATION_ITERS] if cap > 0 else []) + [probe.MLP_MAX_ITER] * fits
    assert ("mlp" in choice.scores) == (fits == 5)
    if fits < 5:
        assert "cap" in choice.note and choice.scores == {"linear": linear}


class Warnings:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warn(self, line: str) -> None:
        self.lines.append(line)


@pytest.mark.parametrize(("reserve", "expected"), [(400.0, "abcd"), (460.0, "ab"), (530.0, "a"), (560.0, "abcdefg")])
def test_probing_stops_before_it_eats_the_fine_tuning_reserve(reserve: float, expected: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Probes of 50 s in a 600 s budget: one more is probed only while now + 50 s + the reserve fit; a reserve out
    of reach after the first probe (560 s after 50 s) protects nothing, and probing goes on until half the budget
    (300 s) is spent."""
    clock = FakeClock()

    def fake_probe(candidate: orchestrate.Candidate, *args: object) -> SimpleNamespace:
        clock.now += 50.0
        return SimpleNamespace(seconds=50.0, backbone=None)

    monkeypatch.setattr(orchestrate, "time", clock)
    monkeypatch.setattr(orchestrate, "probe", fake_probe)
    monkeypatch.setattr(orchestrate, "load_or_skip", lambda candidate, cfg, reporter: SimpleNamespace())
    monkeypatch.setattr(orchestrate, "reserve_for", lambda backbone, cfg, work: reserve)
    reporter = Warnings()
    candidates = [orchestrate.Candidate(name) for name in "abcdefghij"]
    probed, kept = orchestrate.probe_all(candidates, resolve_config(), [], np.array([]), reporter, (0.0, 600.0), ELPV)
    assert "".join(probed) == expected and kept == reserve
    assert len(reporter.lines) == 10 - len(expected)
    out_of_reach = reserve == 560.0
    assert sum("fine-tuning epochs" in line for line in reporter.lines) == (0 if out_of_reach else 10 - len(expected))
    assert sum("half the budget" in line for line in reporter.lines) == (3 if out_of_reach else 0)


@pytest.mark.parametrize(("args", "message"), [
    (["--backbones", "no_such_net"], "unknown backbone 'no_such_net'"),
    (["--time-budget", "0"], "--time-budget must be a number of minutes more than 0"),
    (["--time-budget", "-3"], "--time-budget must be a number of minutes more than 0"),
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
    monkeypatch.setattr("transferkit.auto.orchestrate.has_offline_weights", lambda spec: False)
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
