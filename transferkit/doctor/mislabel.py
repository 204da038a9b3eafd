"""Possibly mislabeled images: cleanlab's confident learning (Northcutt et al., 2021) on out-of-fold probabilities.

A linear model on the frozen backbone's embeddings predicts each image from folds that did not see it; cleanlab's
`find_label_issues` (the reference implementation of the paper) decides which given labels those probabilities
contradict.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer

from transferkit.cpu import blas_threads_for
from transferkit.data.sources import Sample

MAX_FOLDS = 5
# Rows are L2-normalised (the cosine geometry of the near-duplicate check) rather than standardised (decision 0223);
# on max-pooled embeddings C=10 flagged 24-34% fewer clean images than 100 for up to 2 points of recall (0306).
INVERSE_REGULARISATION = 10.0


def likely_mislabeled(samples: Sequence[Sample], vectors: np.ndarray, seed: int) -> tuple[list[dict], list[str]]:
    """Suspects sorted by margin (most confident first), and notes on what the check left out or skipped."""
    tally = Counter(s.label for s in samples)
    too_small = sorted(name for name, n in tally.items() if n < 2)
    notes = [f"mislabel check leaves out class '{name}': cross-validation needs 2 images of it" for name in too_small]
    kept = [i for i, s in enumerate(samples) if s.label not in too_small]
    names = sorted({samples[i].label for i in kept})
    if len(names) < 2:
        return [], [*notes, "mislabel check skipped: it needs at least 2 classes with 2 or more images"]
    given = np.array([names.index(samples[i].label) for i in kept])
    probs = out_of_fold_probabilities(vectors[kept], given, seed)
    suspects = []
    for row, rival in label_issues(probs, given):
        sample = samples[kept[row]]
        suspects.append({
            "path": sample.path,
            "split": sample.split,
            "label": sample.label,
            "suggested": names[rival],
            "probability": round(float(probs[row, rival]), 4),
            "label_probability": round(float(probs[row, given[row]]), 4),
            "margin": round(float(probs[row, rival] - probs[row, given[row]]), 4),
        })
    if suspects:
        agreement = float(np.mean(probs.argmax(axis=1) == given))
        notes.append(f"mislabel check: its model agrees with {agreement:.0%} of the labels out of fold; the lower that "
                     "is, the more of the suspects are hard images rather than wrong labels (decision 0306)")
    return sorted(suspects, key=lambda s: -s["margin"]), notes


def out_of_fold_probabilities(vectors: np.ndarray, given: np.ndarray, seed: int,
                              inverse_regularisation: float = INVERSE_REGULARISATION) -> np.ndarray:
    """Each row predicted by a model fitted without it; K folds, fewer when the smallest class is smaller.

    Ours rather than cleanlab's `estimate_cv_predicted_probabilities`: that one keeps 5 folds even when a class has
    2 images, so a fold can train without a class."""
    folds = min(MAX_FOLDS, int(np.bincount(given).min()))
    model = make_pipeline(Normalizer(), LogisticRegression(C=inverse_regularisation, max_iter=2000))
    # a fit stopped at max_iter still ranks images by confidence, which is all the check uses
    with warnings.catch_warnings(), blas_threads_for(*vectors.shape, int(given.max()) + 1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cross_val_predict(model, vectors, given, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                 method="predict_proba")


def label_issues(probs: np.ndarray, given: np.ndarray) -> list[tuple[int, int]]:
    """(row, suggested class) for each row cleanlab finds mislabeled; the suggestion is the likeliest other class."""
    from cleanlab.filter import find_label_issues  # imports pandas: only when the check runs

    with warnings.catch_warnings():
        # small sets make cleanlab warn about classes with few examples; the check still ranks what it can
        warnings.simplefilter("ignore")
        flagged = find_label_issues(given, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    rivals = probs.copy()
    rivals[np.arange(len(given)), given] = -1.0
    return [(int(row), int(rivals[row].argmax())) for row in np.nonzero(flagged)[0]]
