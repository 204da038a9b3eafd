"""Stage 1's linear head fitted exactly: a convex problem, so solve it instead of running SGD epochs.

The features are standardised, scikit-learn's L-BFGS logistic regression is fitted for each inverse regularisation
C of a grid (warm-started from the previous, smaller C) and the C with the lowest validation log-loss is kept. The
standardisation is folded into the weights, so the head is an ordinary `nn.Linear` on the raw features and export,
serve and predict need nothing new. Multi-depth features (Head2Toe-style) are chosen the same way: the depth set
whose exact head has the lowest validation loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from torch import nn

from transferkit.cpu import blas_threads_for

C_GRID = tuple(float(c) for c in np.logspace(-4, 0, 9))  # half-decade steps; the optimum is often 1e-3..1e-2
MAX_ITER = 1000
PATIENCE = 2  # grid steps the validation loss may rise before the search stops


@dataclass(frozen=True)
class LinearFit:
    """A fitted linear head on the raw (unstandardised) features: logits = features @ weight.T + bias."""

    weight: np.ndarray  # (outputs, D)
    bias: np.ndarray  # (outputs,)
    C: float
    val_loss: float

    def load_into(self, layer: nn.Linear) -> None:
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(self.weight).to(layer.weight))
            layer.bias.copy_(torch.from_numpy(self.bias).to(layer.bias))


def fit_linear(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, outputs: int,
               grid: Sequence[float] = C_GRID, class_weights: np.ndarray | None = None) -> LinearFit:
    """The logistic regression with the best validation log-loss along `grid` (ascending C, stopped once the loss has
    risen PATIENCE times in a row past its best), as a head with `outputs` logits: one
    (binary, logit > 0 means class 1), or one per class (softmax; two classes included). Every class must be in
    `train_y`. Deterministic: L-BFGS from zeros, then warm starts along the grid. `class_weights` (one per class,
    class_balance weights) weigh the training loss and the validation loss that chooses C alike."""
    scaler = StandardScaler().fit(train_x.astype(np.float64))
    train_s, val_s = scaler.transform(train_x.astype(np.float64)), scaler.transform(val_x.astype(np.float64))
    weighted = None if class_weights is None else dict(enumerate(class_weights.tolist()))
    val_weights = None if class_weights is None else class_weights[val_y]
    model = LogisticRegression(max_iter=MAX_ITER, warm_start=True, class_weight=weighted)
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    rises = 0
    # the weakest regularisations may stop at MAX_ITER; their fit still scores
    with warnings.catch_warnings(), blas_threads_for(*train_x.shape, outputs):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in sorted(grid):
            model.set_params(C=c).fit(train_s, train_y)
            loss = log_loss(val_y, model.predict_proba(val_s), labels=model.classes_, sample_weight=val_weights)
            if best is None or loss < best[0]:
                best, rises = (loss, c, model.coef_.copy(), model.intercept_.copy()), 0
            elif (rises := rises + 1) >= PATIENCE:  # past the minimum: weaker regularisation overfits more, slower
                break
    loss, c, coef, intercept = best
    if outputs == 2:  # sklearn's binary model has one logit z: a softmax over (-z/2, z/2) gives the same probabilities
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weight = coef / scaler.scale_
    bias = intercept - weight @ scaler.mean_
    return LinearFit(weight.astype(np.float32), bias.astype(np.float32), c, float(loss))


def depth_candidates(levels: Sequence[int]) -> list[tuple[int, ...]]:
    """The depth sets compared on validation: the last layer alone, then the top 1, 2, ... intermediate levels
    added, down to all of them (nested, so the choice is one number and the cost grows linearly)."""
    levels = list(levels)
    return [tuple(levels[len(levels) - k :]) if k else () for k in range(len(levels) + 1)]


def choose_depths(columns: dict[tuple[int, ...], np.ndarray], train_x: np.ndarray, train_y: np.ndarray,
                  val_x: np.ndarray, val_y: np.ndarray, outputs: int, class_weights: np.ndarray | None = None
                  ) -> tuple[tuple[int, ...], LinearFit]:
    """The depth set (a key of `columns`: which columns of the all-level features it is) whose exact linear head
    has the lowest validation loss, with that head. Ties go to the fewer features (the earlier key)."""
    best: tuple[tuple[int, ...], LinearFit] | None = None
    for depths, cols in columns.items():
        fit = fit_linear(train_x[:, cols], train_y, val_x[:, cols], val_y, outputs, class_weights=class_weights)
        if best is None or fit.val_loss < best[1].val_loss:
            best = (depths, fit)
    return best
