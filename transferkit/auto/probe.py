"""Cheap estimates of transfer accuracy from frozen features: cross-validated linear (and one-hidden-layer) probes,
and the rule that turns their scores into a choice."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer

from transferkit.data.sources import Sample

MAX_FOLDS = 5
MAX_PROBE_IMAGES = 2000  # enough to rank backbones; the rest of a large dataset is left for training
# Rows are L2-normalised, not standardised: with a few dozen images of ~1000-dim features, standardising blows up
# near-constant dimensions (doctor's mislabel check measured the same).
INVERSE_REGULARISATION = 10.0
HIDDEN_UNITS = 256  # the one hidden layer the MLP head candidate has
TIE_CAP = 0.02  # a tie is within one sd of the best, but never more than 2 points of accuracy below it


@dataclass(frozen=True)
class Score:
    """Accuracy over the cross-validation folds."""

    mean: float
    sd: float
    folds: int


@dataclass(frozen=True)
class Option:
    """Something to choose (a backbone, a head) with its probe score and what it costs to use."""

    name: str
    score: Score
    cost: float  # e.g. parameters: among ties the cheapest wins


def pick(options: Sequence[Option]) -> Option:
    """The best mean accuracy, unless a cheaper option ties with it: within one sd of the best (capped at TIE_CAP),
    so an option clearly worse than another is never picked."""
    best = max(options, key=lambda o: o.score.mean)
    tolerance = min(best.score.sd, TIE_CAP)
    tied = [o for o in options if o.score.mean >= best.score.mean - tolerance]
    return min(tied, key=lambda o: (o.cost, -o.score.mean))


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
    with warnings.catch_warnings():
        # a fit stopped at max_iter still scores; a class smaller than K only makes its folds uneven
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="The least populated class")
        scores = cross_val_score(estimator, features, labels, cv=cv, scoring="accuracy")
    return Score(float(scores.mean()), float(scores.std()), cv.get_n_splits())


def linear_probe() -> Pipeline:
    return make_pipeline(Normalizer(), LogisticRegression(C=INVERSE_REGULARISATION, max_iter=500))


def mlp_probe(seed: int) -> Pipeline:
    return make_pipeline(Normalizer(), MLPClassifier((HIDDEN_UNITS,), solver="lbfgs", max_iter=300, random_state=seed))


def choose_head(features: np.ndarray, labels: np.ndarray, seed: int) -> tuple[list[int], dict[str, Score]]:
    """Linear head or one hidden layer, by the same cross-validation (same folds) as the backbone probe; the hidden
    layer must clearly beat the linear head, whose parameters are fewer. Returns (head_hidden, scores)."""
    dim, classes = features.shape[1], len(np.unique(labels))
    options = [Option("linear", cv_accuracy(linear_probe(), features, labels, seed), dim * classes),
               Option("mlp", cv_accuracy(mlp_probe(seed), features, labels, seed),
                      dim * HIDDEN_UNITS + HIDDEN_UNITS * classes)]
    chosen = pick(options)
    return ([HIDDEN_UNITS] if chosen.name == "mlp" else []), {o.name: o.score for o in options}
