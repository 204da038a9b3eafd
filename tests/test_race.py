"""auto's race: a paused run resumes to the uninterrupted result; the race keeps the finalist with the clearly better
fine-tuned validation score (not the probe's favourite) and its run ends as if trained straight through; racing is
planned only when both finalists keep their reserved epochs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import make_class_folders
from tests.test_auto import ELPV, ELPV_SPEEDS, run_and_capture
from tests.test_resume import history
from transferkit import api
from transferkit.auto import orchestrate, race
from transferkit.auto.plan import RACE_EPOCHS, RESERVED_EPOCHS, Speeds, plan_race, plan_training
from transferkit.config import resolve_config
from transferkit.data.sources import scan_dataset
from transferkit.training.callbacks import PauseAfter
from transferkit.training.checkpoint import CHECKPOINT


@pytest.fixture
def racing(fast: dict) -> dict:
    return {**fast, "epochs_frozen": 4, "epochs_finetune": RACE_EPOCHS + 1, "augment": "light", "unfreeze": "1",
            "patience": 0, "lr": 3e-2, "finetune_lr": 1e-2}


def test_a_paused_run_resumes_to_the_uninterrupted_result(dataset: Path, tmp_path: Path, racing: dict) -> None:
    straight = api.train(dataset, tmp_path / "straight", **racing)
    assert api.train(dataset, tmp_path / "paused", callbacks=[PauseAfter(1)], **racing) is None
    paused = tmp_path / "paused"
    assert (paused / CHECKPOINT).is_file() and not (paused / "meta.json").exists()
    assert [row[1] for row in history(paused)[1:]] == ["frozen"] * 4 + ["finetune"]  # stopped after 1 epoch
    resumed = api.resume(paused)
    assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], abs=1e-5)
    assert history(paused) == history(tmp_path / "straight")


def test_a_run_that_ends_within_the_pause_is_finished(dataset: Path, tmp_path: Path, racing: dict) -> None:
    run = api.train(dataset, tmp_path / "short", callbacks=[PauseAfter(RACE_EPOCHS + 2)], **racing)
    assert run is not None and (tmp_path / "short" / "metrics.json").is_file()


def test_the_race_keeps_the_better_finalist_and_finishes_its_run(tmp_path: Path, racing: dict,
                                                                 crippled_weights: str) -> None:
    """The zeroed backbone (constant features), run first as if the probe had picked it, loses to the real one by
    more than a standard error; the winner's run, moved up into RUN and resumed, ends exactly as the same options
    trained straight through."""
    index = scan_dataset(make_class_folders(tmp_path / "data", classes=2, per_class=40), 0.3, 0.0, 0)
    options = {k: v for k, v in racing.items() if k not in ("backbone", "weights", "quiet")}
    finalists = {"test_efficientnet_gn": {"backbone": "test_efficientnet_gn", "weights": crippled_weights},
                 "test_efficientnet": {"backbone": "test_efficientnet", "weights": racing["weights"]}}
    out = tmp_path / "run"
    out.mkdir()
    laps = race.race(finalists, index, out, True, options)
    assert [lap.name for lap in laps] == list(finalists)
    assert all(lap.finetune_epochs == RACE_EPOCHS and not lap.finished for lap in laps)
    for lap in laps:  # scored by its best fine-tuning epoch, the frozen head's epochs left out
        rows = history(out / race.RACE_FOLDER / lap.name)
        loss = rows[0].index("val_loss")
        assert lap.val_loss == min(float(row[loss]) for row in rows[1:] if row[1] == "finetune")
    best = race.winner(laps, "val_loss", len(index.split("val")))
    assert best.name == "test_efficientnet" and best.val_loss < laps[0].val_loss
    run = race.finish(best, index, out, quiet=True)
    assert not (out / race.RACE_FOLDER).exists() and not (out / CHECKPOINT).exists()
    assert run.meta["backbone"] == "test_efficientnet"
    straight = api.train(index, tmp_path / "straight", **racing)
    assert run.metrics["loss"] == pytest.approx(straight.metrics["loss"], abs=1e-5)
    assert history(out) == history(tmp_path / "straight")


def test_the_winner_must_beat_the_probes_pick_by_more_than_a_standard_error() -> None:
    laps = [race.Lap("probe_pick", 0.3369, 0.85, 3, 1.0, False), race.Lap("runner_up", 0.30, 0.84, 3, 1.0, False)]
    assert race.winner(laps, "val_loss", 393).name == "runner_up"  # 0.037 apart, one standard error 0.017
    assert race.winner([laps[0], replace(laps[1], val_loss=0.3332)], "val_loss", 393).name == "probe_pick"  # ELPV
    assert race.winner(laps, "val_loss", 30).name == "probe_pick"  # on 30 images 0.037 is noise (0.062)
    assert race.winner(laps, "val_acc", 393).name == "probe_pick"  # it has the better accuracy anyway
    assert race.winner([laps[0], replace(laps[1], val_acc=0.92)], "val_acc", 393).name == "runner_up"
    assert race.winner([laps[0], replace(laps[1], val_acc=0.86)], "val_acc", 393).name == "probe_pick"  # SE 0.018


def test_auto_follows_the_race_not_the_probe(tmp_path: Path, tiny_weights: str, crippled_weights: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With the race's scores turned around, the backbone the probe ranks last is the one trained and recorded."""
    real_race = orchestrate.race

    def rigged(*args, **kwargs):
        return [replace(lap, val_loss=1.0 if lap.name == "test_efficientnet" else 0.1)
                for lap in real_race(*args, **kwargs)]

    monkeypatch.setattr(orchestrate, "race", rigged)
    data = make_class_folders(tmp_path / "data", classes=3, per_class=12)
    config = tmp_path / "fast.yaml"
    config.write_text("augment: none\nepochs_frozen: 3\n")
    backbones = f"test_efficientnet={tiny_weights},test_efficientnet_gn={crippled_weights}"
    monkeypatch.chdir(tmp_path)  # and no --out: the run goes to runs/data-auto
    code, printed = run_and_capture(["auto", str(data), "--backbones", backbones,
                                     "--time-budget", "5", "--config", str(config), "--json", "--image-size", "32",
                                     "--batch-size", "8", "--workers", "0", "--quiet"])
    assert code == 0
    (tmp_path / "runs" / "data-auto").rename(tmp_path / "run")
    summary = json.loads(printed)
    assert [row["backbone"] for row in summary["leaderboard"]][0] == "test_efficientnet"  # the probe's favourite
    assert summary["chosen"] == "test_efficientnet_gn"
    assert [lap["backbone"] for lap in summary["race"]] == ["test_efficientnet", "test_efficientnet_gn"]
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["backbone"] == "test_efficientnet_gn"
    chosen = [row for row in summary["leaderboard"] if row["chosen"]]
    assert [(row["backbone"], row["race_val_loss"]) for row in chosen] == [("test_efficientnet_gn", 0.1)]
    html = (tmp_path / "run" / "report.html").read_text()
    assert "<b>test_efficientnet_gn</b>" in html and "race val loss" in html


def test_racing_is_planned_only_when_both_finalists_keep_their_reserved_epochs() -> None:
    config = resolve_config(augment="light", feature_views=1)
    slower = Speeds(inference=ELPV_SPEEDS.inference * 1.5, finetune=ELPV_SPEEDS.finetune * 1.5, head=6e-5)
    roomy = plan_race(1800, ELPV, [ELPV_SPEEDS, slower], config)
    assert len(roomy) == 2 and roomy[0].epochs_finetune == roomy[1].epochs_finetune >= RESERVED_EPOCHS
    alone = plan_training(1800, ELPV, ELPV_SPEEDS, config)
    assert roomy[0].epochs_finetune <= alone.epochs_finetune  # the loser's laps are paid for
    for plan, speeds in zip(roomy, [ELPV_SPEEDS, slower], strict=True):
        other = slower if speeds is ELPV_SPEEDS else ELPV_SPEEDS
        race_cost = plan_training(0, ELPV, other, config).estimated_seconds  # its minimum, no fine-tuning
        assert plan.estimated_seconds + race_cost <= 1800
    tight = plan_race(400, ELPV, [ELPV_SPEEDS, slower], config)
    assert tight == [plan_training(400, ELPV, ELPV_SPEEDS, config)]  # no room to race: the probe's pick alone
    assert plan_race(1800, ELPV, [ELPV_SPEEDS], config) == [alone]


def test_a_plan_without_fine_tuning_races_the_frozen_stages_when_both_fit() -> None:
    """epochs_finetune 0 (what auto sets where fine-tuning does not pay, decision 0304): no plan buys an epoch; the
    finalists race when both whole frozen runs fit, else the probe's pick trains alone; a number caps the plan."""
    config = resolve_config(augment="light", feature_views=1, epochs_finetune=0)
    slower = Speeds(inference=ELPV_SPEEDS.inference * 1.5, finetune=ELPV_SPEEDS.finetune * 1.5, head=6e-5)
    frozen = plan_race(1800, ELPV, [ELPV_SPEEDS, slower], config)
    assert [plan.epochs_finetune for plan in frozen] == [0, 0]
    assert sum(plan.estimated_seconds for plan in frozen) <= 1800
    budget = sum(plan.estimated_seconds for plan in frozen)
    assert len(plan_race(budget + 1, ELPV, [ELPV_SPEEDS, slower], config)) == 2
    assert plan_race(budget - 1, ELPV, [ELPV_SPEEDS, slower], config) == [frozen[0]]
    capped = plan_race(1800, ELPV, [ELPV_SPEEDS, slower], resolve_config(augment="light", feature_views=1,
                                                                         epochs_finetune=2))
    assert [plan.epochs_finetune for plan in capped] == [2, 2]  # the race needs 2, not RESERVED_EPOCHS, then


def test_auto_fine_tunes_on_a_small_cpu_set_only_when_the_config_asks(tmp_path: Path, tiny_weights: str,
                                                                      crippled_weights: str,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """On a CPU with fewer training images than fine-tuning needs to pay (decision 0303) auto races the frozen
    stages; epochs_finetune in the config brings the fine-tuning race back, at most that many epochs."""
    data = make_class_folders(tmp_path / "data", classes=2, per_class=12)
    backbones = f"test_efficientnet={tiny_weights},test_efficientnet_gn={crippled_weights}"
    summaries = {}
    for name, extra in (("frozen", ""), ("asked", "epochs_finetune: 4\n")):
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"augment: none\nepochs_frozen: 3\n{extra}")
        code, printed = run_and_capture(["auto", str(data), "--out", str(tmp_path / name), "--backbones", backbones,
                                         "--time-budget", "5", "--config", str(config), "--json", "--image-size",
                                         "32", "--batch-size", "8", "--workers", "0"])
        assert code == 0
        summaries[name] = json.loads(printed)
        said = capsys.readouterr().err
        assert "nothing to resume" not in said  # the finished winner is taken as it is, not "resumed"
        assert ("their frozen stages" in said) == (name == "frozen")
        # the announced plan names a learning rate and unfrozen blocks only where fine-tuning uses them
        assert ("no fine-tuning" in said and "unfreeze" not in said) == (name == "frozen")
        assert "head linear, solved" in said and ", lr " not in said
    frozen, asked = summaries["frozen"], summaries["asked"]
    assert frozen["metrics"] == json.loads((tmp_path / "frozen" / "metrics.json").read_text())
    assert frozen["plan"]["epochs_finetune"] == 0 and [lap["finetune_epochs"] for lap in frozen["race"]] == [0, 0]
    assert "finetune" not in {row[1] for row in history(tmp_path / "frozen")[1:]}
    assert 0 < asked["plan"]["epochs_finetune"] <= 4
    assert [lap["finetune_epochs"] for lap in asked["race"]] == [RACE_EPOCHS, RACE_EPOCHS]
    assert "finetune" in {row[1] for row in history(tmp_path / "asked")[1:]}


def test_with_ensemble_on_both_finalists_whole_runs_fit_the_budget() -> None:
    config = resolve_config(augment="light", feature_views=1, ensemble=True)
    slower = Speeds(inference=ELPV_SPEEDS.inference * 1.5, finetune=ELPV_SPEEDS.finetune * 1.5, head=6e-5)
    both = plan_race(1800, ELPV, [ELPV_SPEEDS, slower], config)
    assert len(both) == 2 and both[0].epochs_finetune == both[1].epochs_finetune >= RESERVED_EPOCHS
    assert sum(plan.estimated_seconds for plan in both) <= 1800
    budget = sum(plan.estimated_seconds for plan in both) - 1  # one second short of two whole runs at that length
    tighter = plan_race(budget, ELPV, [ELPV_SPEEDS, slower], config)
    assert RESERVED_EPOCHS <= tighter[0].epochs_finetune == tighter[1].epochs_finetune < both[0].epochs_finetune
    assert sum(plan.estimated_seconds for plan in tighter) <= budget
    racing = plan_race(budget, ELPV, [ELPV_SPEEDS, slower], resolve_config(augment="light", feature_views=1))
    assert racing[0].epochs_finetune > tighter[0].epochs_finetune  # without ensemble only the winner goes on
    assert plan_race(400, ELPV, [ELPV_SPEEDS, slower], config) == [plan_training(400, ELPV, ELPV_SPEEDS, config)]

