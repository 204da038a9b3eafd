"""Cheap estimates of transfer accuracy from frozen features: cross-validated linear (and one-hidden-layer) probes,
and the rule that turns their scores into a choice."""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer

from transferkit.cpu import blas_threads_for
from transferkit.data.sources import Sample

MAX_FOLDS = 5
MAX_PROBE_IMAGES = 2000  # enough to rank backbones; the rest of a large dataset is left for training
# Rows are L2-normalised, not standardised: with a few dozen images of ~1000-dim features, standardising blows up
# near-constant dimensions (doctor's mislabel check measured the same).
INVERSE_REGULARISATION = 10.0
HIDDEN_UNITS = 256  # the one hidden layer the MLP head candidate has
MLP_MAX_ITER = 300
CALIBRATION_ITERS = 10  # a short fit that times the MLP's lbfgs iterations before a whole fold is risked
HEAD_SHARE = 0.05  # of the time budget: the most the head choice may spend (30 s of 10 minutes)
TIE_CAP = 0.02  # a tie is within one sd of the best, but never more than 2 points of accuracy below it


@dataclass(frozen=True)
class Score:
    """Accuracy over the cross-validation folds."""

    mean: float
    sd: float
    folds: int

    def to_json(self) -> dict:
        return {"accuracy": round(self.mean, 4), "sd": round(self.sd, 4), "folds": self.folds}


@dataclass(frozen=True)
class Option:
    """Something to choose (a backbone, a head) with its probe score and what it costs to use."""

    name: str
    score: Score
    cost: float  # e.g. parameters: among ties the cheapest wins


def pick(options: Sequence[Option], preferred: str | None = None) -> Option:
    """The best mean accuracy, unless another option ties with it: within one sd of the best (capped at TIE_CAP),
    so an option clearly worse than another is never picked. A tie goes to `preferred` when it is tied (the
    option with the best record beyond this probe), else to the cheapest."""
    best = max(options, key=lambda o: o.score.mean)
    tolerance = min(best.score.sd, TIE_CAP)
    tied = [o for o in options if o.score.mean >= best.score.mean - tolerance]
    return next((o for o in tied if o.name == preferred), None) or min(tied, key=lambda o: (o.cost, -o.score.mean))


def probe_subset(samples: Sequence[Sample], limit: int, seed: int) -> list[Sample]:
    """All samples, or a seeded per-class sample of about `limit` that keeps the class proportions (2+ per class,
    so every class can still be split across folds)."""
    if len(samples) <= limit:
        return list(samples)
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        by_class[sample.label].append(i)
    kept: list[int] = []
    for members in by_class.values():
        share = max(2, round(limit * len(members) / len(samples)))
        kept += rng.choice(members, min(share, len(members)), replace=False).tolist()
    return [samples[i] for i in sorted(kept)]


def folds(labels: np.ndarray, seed: int) -> StratifiedKFold:
    """K-fold with K = 5, fewer when the smallest class has fewer images (at least 2 folds)."""
    smallest = int(np.unique(labels, return_counts=True)[1].min())
    return StratifiedKFold(max(2, min(MAX_FOLDS, smallest)), shuffle=True, random_state=seed)


def cv_accuracy(estimator: Pipeline, features: np.ndarray, labels: np.ndarray, seed: int) -> Score:
    cv = folds(labels, seed)
    with quiet_fits(*features.shape, len(np.unique(labels))):
        scores = cross_val_score(estimator, features, labels, cv=cv, scoring="accuracy")
    return Score(float(scores.mean()), float(scores.std()), cv.get_n_splits())


@contextmanager
def quiet_fits(rows: int, features: int, outputs: int) -> Iterator[None]:
    """Fits of a problem this size, quietly (a fit stopped at max_iter still scores; a class smaller than K only
    makes its folds uneven) and on the BLAS threads that suit its size (cpu.blas_threads_for)."""
    with warnings.catch_warnings(), blas_threads_for(rows, features, outputs):
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        warnings.filterwarnings("ignore", message="The least populated class")
        yield


def linear_probe() -> Pipeline:
    return make_pipeline(Normalizer(), LogisticRegression(C=INVERSE_REGULARISATION, max_iter=500))


def mlp_probe(seed: int, max_iter: int = MLP_MAX_ITER) -> Pipeline:
    return make_pipeline(Normalizer(), MLPClassifier((HIDDEN_UNITS,), solver="lbfgs", max_iter=max_iter,
                                                     random_state=seed))


@dataclass(frozen=True)
class HeadChoice:
    hidden: list[int]  # TrainConfig.head_hidden: [] is the linear head
    scores: dict[str, Score]  # "linear", and "mlp" when it was cross-validated within the cap
    seconds: float  # what the choice cost (the MLP's folds and their estimate)
    note: str  # why the MLP was or was not compared

    def to_json(self) -> dict:
        scores = {name: score.to_json() for name, score in self.scores.items()}
        return {"hidden": self.hidden, **scores, "seconds": round(self.seconds, 1), "note": self.note}


def choose_head(features: np.ndarray, labels: np.ndarray, seed: int, linear: Score, cap: float) -> HeadChoice:
    """Linear head or one hidden layer, by the same cross-validation (same folds) as the backbone probe, in at most
    about `cap` seconds; the hidden layer must clearly beat the linear head, whose parameters are fewer.

    The linear score is the winner's backbone probe (the same estimator on the same features and folds), so it costs
    nothing. The MLP's folds cost far more and rarely pay (decision 0221), so it is cross-validated only while the
    cap allows: before each fold, the fold's cost is estimated (first from a CALIBRATION_ITERS-iteration
    fit, then from the slowest fold so far), and when it would pass the cap the MLP is not compared and the linear
    head is kept. The cap is exceeded only by a fold that runs slower than its estimate."""
    dim, classes = features.shape[1], len(np.unique(labels))
    linear_option = Option("linear", linear, dim * classes)
    start = time.perf_counter()
    with quiet_fits(*features.shape, HIDDEN_UNITS):
        splits = list(folds(labels, seed).split(features, labels))
    estimate = calibrated_fold_seconds(features[splits[0][0]], labels[splits[0][0]], seed, cap)
    scores: list[float] = []
    fold_seconds: list[float] = []
    for train, test in splits:
        if time.perf_counter() - start + estimate > cap:
            note = (f"MLP not cross-validated: a fold takes ~{estimate:.0f}s, {len(scores)}/{len(splits)} done "
                    f"within the {cap:.0f}s cap")
            return HeadChoice([], {"linear": linear}, time.perf_counter() - start, note)
        fold_start = time.perf_counter()
        with quiet_fits(len(train), dim, HIDDEN_UNITS):
            scores.append(mlp_probe(seed).fit(features[train], labels[train]).score(features[test], labels[test]))
        fold_seconds.append(time.perf_counter() - fold_start)
        estimate = max(fold_seconds)  # measured folds replace the calibration
    mlp = Score(float(np.mean(scores)), float(np.std(scores)), len(splits))
    chosen = pick([linear_option, Option("mlp", mlp, dim * HIDDEN_UNITS + HIDDEN_UNITS * classes)])
    return HeadChoice([HIDDEN_UNITS] if chosen.name == "mlp" else [], {"linear": linear, "mlp": mlp},
                      time.perf_counter() - start, f"MLP cross-validated within the {cap:.0f}s cap")


def calibrated_fold_seconds(features: np.ndarray, labels: np.ndarray, seed: int, cap: float) -> float:
    """One MLP fold's seconds, extrapolated from a fit of CALIBRATION_ITERS lbfgs iterations (each costs about the
    same); no calibration (infinitely long) when the cap leaves no time at all."""
    if cap <= 0:
        return math.inf
    start = time.perf_counter()
    with quiet_fits(*features.shape, HIDDEN_UNITS):
        mlp_probe(seed, CALIBRATION_ITERS).fit(features, labels)
    return (time.perf_counter() - start) * MLP_MAX_ITER / CALIBRATION_ITERS
