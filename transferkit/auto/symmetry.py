"""Does the data look the same turned and mirrored (solar cells, micrographs, satellite tiles)? `auto` asks its
probe: the linear probe trained on the 8 symmetries of each probe image and predicting their average, against the
probe on the clean view, on the same folds. Dihedral training views and test-time views are chosen only when they
win by more than a standard error of the per-fold differences and by at least MIN_GAIN (decisions 0292, 0293)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from transferkit.auto.embedding import view_features
from transferkit.auto.plan import Plan
from transferkit.auto.probe import Score, folds, linear_probe, quiet_fits
from transferkit.config import TrainConfig
from transferkit.data.sources import Sample
from transferkit.features.extract import symmetry_view
from transferkit.models import tta
from transferkit.models.pretrained import Backbone
from transferkit.progress import Reporter

SYMMETRY_SHARE = 0.15  # of the time left after probing: what the probe images' 7 other views may always take
DIHEDRAL = {"augment": "dihedral", "tta": "dihedral"}
MIN_GAIN = 0.005  # probe accuracy the 8 views must add: they cost 8x at every prediction (decisions 0293, 0301)


@dataclass(frozen=True)
class SymmetryChoice:
    dihedral: bool
    note: str  # why, in words
    clean: Score | None = None  # the probe on the clean view
    views: Score | None = None  # the probe on the 8 symmetries, same folds
    gain_se: float | None = None  # standard error of the per-fold gain

    @property
    def options(self) -> dict[str, str]:
        """The api.train options the choice sets."""
        return dict(DIHEDRAL) if self.dihedral else {}

    def to_json(self) -> dict:
        scores = {name: score.to_json() for name, score in (("clean", self.clean), ("dihedral", self.views)) if score}
        gain = {} if self.gain_se is None else {"gain_se": round(self.gain_se, 4)}
        return {"chosen": "dihedral" if self.dihedral else "none", **scores, **gain, "note": self.note}


def allowance(seconds_left: float, plans: Sequence[Plan]) -> float:
    """What the check may spend: SYMMETRY_SHARE of the time left, or all that the finalists' plans leave unused
    (they stop at `most_finetune_epochs`), counting every finalist's whole plan."""
    return max(SYMMETRY_SHARE * seconds_left, seconds_left - sum(plan.estimated_seconds for plan in plans))


def choose_symmetry(backbone: Backbone, clean: np.ndarray, samples: Sequence[Sample], labels: np.ndarray,
                    config: TrainConfig, reporter: Reporter, seconds_allowed: float,
                    seconds_per_image: float) -> SymmetryChoice:
    """Compare the probe on the clean view with the probe on all 8 symmetries, unless the configuration sets the
    augmentation or test-time views itself, or the 7 other views of the probe images would take longer than
    `seconds_allowed` at `seconds_per_image` per view (cached views cost less than that)."""
    if (config.augment, config.tta) != (TrainConfig.augment, TrainConfig.tta):
        return SymmetryChoice(False, "augment or tta set by the configuration: kept")
    others = tta.VIEWS["dihedral"] - 1
    estimate = others * len(samples) * seconds_per_image
    if estimate > seconds_allowed:
        return SymmetryChoice(False, f"not compared: {others} more views of the probe images would take "
                                     f"~{estimate:.0f}s, {max(seconds_allowed, 0):.0f}s are allowed")
    views = [symmetry_view(backbone.pre, config.augmentation().samplewise_center, k) for k in range(1, others + 1)]
    turned = view_features(backbone, samples, config, reporter, views, "symmetries")
    plain, dihedral = paired_fold_accuracies([clean, *turned], labels, config.seed)
    chosen, gain, gain_se = judge(plain, dihedral)
    clean_score, views_score = (Score(float(a.mean()), float(a.std()), len(a)) for a in (plain, dihedral))
    note = (f"the 8 symmetries {'beat' if chosen else 'did not beat'} the clean view by more than a standard "
            f"error and {MIN_GAIN:g} ({gain:+.3f} ± {gain_se:.3f})")
    reporter.log(f"symmetry: probe {clean_score.mean:.3f} on the clean view, {views_score.mean:.3f} on the 8 "
                 f"symmetries: {'dihedral views' if chosen else 'clean view'}")
    return SymmetryChoice(chosen, note, clean_score, views_score, gain_se)


def judge(plain: np.ndarray, dihedral: np.ndarray) -> tuple[bool, float, float]:
    """(whether the 8 views win, their mean per-fold gain, its standard error): they win when the gain beats its
    standard error and MIN_GAIN."""
    gain = dihedral - plain
    gain_se = float(gain.std(ddof=1) / math.sqrt(len(gain)))
    return float(gain.mean()) > max(gain_se, MIN_GAIN), float(gain.mean()), gain_se


def paired_fold_accuracies(views: list[np.ndarray], labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold accuracy of the probe on views[0] (the clean view) and of the probe trained on every view of the
    training folds that averages its probabilities over the views of each held-out image; the same folds."""
    plain, averaged = [], []
    rows, dim = views[0].shape
    with quiet_fits(rows * len(views), dim, len(np.unique(labels))):
        for train, test in folds(labels, seed).split(views[0], labels):
            probe = linear_probe().fit(views[0][train], labels[train])
            plain.append(probe.score(views[0][test], labels[test]))
            stacked = linear_probe().fit(np.concatenate([v[train] for v in views]), np.tile(labels[train], len(views)))
            probabilities = np.mean([stacked.predict_proba(v[test]) for v in views], axis=0)
            averaged.append(float(np.mean(stacked.classes_[probabilities.argmax(axis=1)] == labels[test])))
    return np.array(plain), np.array(averaged)
