"""auto's symmetry check: dihedral views are chosen when the probe on the 8 symmetries of each image clearly beats
the clean view's, refused when the symmetries contradict the classes, skipped when the configuration sets the views
or the time does not allow them; an auto run records the comparison and trains with what it chose."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import make_class_folders
from tests.test_auto import FAST, run_and_capture
from transferkit.auto import symmetry
from transferkit.auto.plan import Plan
from transferkit.config import resolve_config
from transferkit.data.preprocess import Preprocess
from transferkit.progress import Reporter

PRE = Preprocess(image_size=32, interpolation="bilinear", crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
IMAGES, DIM, VIEWS = 120, 16, 8


def synthetic_views(contradicting: bool, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Features of 8 views of two classes: each view the class direction plus its own noise (averaging the views
    removes noise), or with `contradicting` the 4 mirrored views carrying the other class's direction (a mirror that
    swaps the classes, as it swaps '/' and '\\' stripes)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(IMAGES) % 2
    directions = rng.normal(size=(2, DIM))
    views = []
    for k in range(VIEWS):
        shown = 1 - labels if contradicting and k >= VIEWS // 2 else labels
        views.append((directions[shown] * 0.6 + rng.normal(size=(IMAGES, DIM)) + 5).astype(np.float32))
    return views, labels


def choose(views: list[np.ndarray], labels: np.ndarray, monkeypatch: pytest.MonkeyPatch, seconds_allowed: float = 60,
           **settings) -> symmetry.SymmetryChoice:
    asked = []

    def fake_view_features(backbone, samples, config, reporter, wanted, what):
        asked.append([view.index for view in wanted])
        return views[1:]

    monkeypatch.setattr(symmetry, "view_features", fake_view_features)
    choice = symmetry.choose_symmetry(SimpleNamespace(pre=PRE), views[0], [None] * IMAGES, labels,
                                      resolve_config(None, None, **settings), Reporter(quiet=True), seconds_allowed,
                                      0.01)
    assert asked in ([], [list(range(1, VIEWS))])  # the 7 other symmetries, when compared at all
    return choice


def test_symmetries_that_average_noise_away_are_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    choice = choose(*synthetic_views(contradicting=False), monkeypatch)
    assert choice.dihedral and choice.options == {"augment": "dihedral", "tta": "dihedral"}
    assert choice.views.mean > choice.clean.mean + choice.gain_se
    assert choice.to_json()["chosen"] == "dihedral"


def test_symmetries_that_contradict_the_classes_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    choice = choose(*synthetic_views(contradicting=True), monkeypatch)
    assert not choice.dihedral and choice.options == {}
    assert choice.views.mean < choice.clean.mean
    assert choice.to_json()["chosen"] == "none"


@pytest.mark.parametrize(("gains", "chosen"), [
    ([0.004, 0.003, 0.004, 0.003, 0.004], False),  # steady, far beyond its standard error, but under MIN_GAIN
    ([0.02, 0.03, 0.02, 0.03, 0.02], True),
    ([0.009, 0.012, 0.003, 0.01, 0.011], True),  # ELPV's gain on Lite1's max-pooled features (decision 0301)
    ([0.06, -0.04, 0.05, -0.03, 0.0], False),  # a mean of 0.008 inside its standard error of 0.02
])
def test_the_views_must_win_beyond_their_standard_error_and_by_the_minimum_gain(gains: list[float],
                                                                                chosen: bool) -> None:
    plain = np.full(len(gains), 0.8)
    assert symmetry.judge(plain, plain + np.array(gains))[0] is chosen


@pytest.mark.parametrize(("settings", "seconds_allowed", "note"), [
    ({"augment": "none"}, 60, "set by the configuration"),
    ({"tta": "flip"}, 60, "set by the configuration"),
    ({}, 1.0, "not compared"),  # 7 views x 120 images x 0.01 s = 8.4 s > 1 s
])
def test_no_comparison_when_the_configuration_or_the_time_decides(settings: dict, seconds_allowed: float, note: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    choice = choose(*synthetic_views(contradicting=False), monkeypatch, seconds_allowed, **settings)
    assert not choice.dihedral and note in choice.note and choice.clean is None


def test_auto_records_the_symmetry_comparison_and_trains_with_its_choice(tmp_path: Path, tiny_weights: str) -> None:
    data = make_class_folders(tmp_path / "data", classes=2, per_class=12)
    config = tmp_path / "fast.yaml"
    config.write_text("epochs_frozen: 2\n")
    out = tmp_path / "run"
    code, printed = run_and_capture(["auto", str(data), "--out", str(out), "--backbones",
                                     f"test_efficientnet={tiny_weights}", "--time-budget", "5", "--config",
                                     str(config), "--cache-dir", str(tmp_path / "cache"), "--json", *FAST])
    assert code == 0
    recorded = json.loads(printed)["symmetry"]
    assert set(recorded) >= {"chosen", "clean", "dihedral", "gain_se", "note"}
    assert recorded == json.loads((out / "auto.json").read_text())["symmetry"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tta"] == ("dihedral" if recorded["chosen"] == "dihedral" else "none")


def test_the_check_may_spend_what_the_plans_leave_unused_and_always_a_share() -> None:
    def plans(*seconds: float) -> list[Plan]:
        return [Plan(epochs_finetune=5, feature_views=1, estimated_seconds=s) for s in seconds]

    assert symmetry.allowance(1000, plans(300, 200)) == 500  # the finalists' plans stop short of the budget
    assert symmetry.allowance(1000, plans(700, 400)) == symmetry.SYMMETRY_SHARE * 1000  # they fill it: a share
