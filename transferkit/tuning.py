"""After training, on the validation images: test-time augmentation (auto: the mode that lowers the validation
loss), the calibrating temperature, and the decision threshold(s). What is chosen goes into meta.json, and every
consumer of the run (evaluate, predict, serve, export) applies it."""

from __future__ import annotations

import time

import numpy as np
import torch

from transferkit.data.loader import Labelled
from transferkit.features.extract import ViewLogitsOf
from transferkit.models import tta
from transferkit.progress import Reporter
from transferkit.runs.run import infer_logits
from transferkit.task import calibration, multilabel
from transferkit.task.kinds import Task


def validation_choices(model: torch.nn.Module, val: Labelled, transform, task: Task, tta_choice: str,
                       operating_point: str, reporter: Reporter, view_logits: ViewLogitsOf | None = None) -> dict:
    """meta.json entries: tta, temperature, and a binary task's operating point and threshold (a multi-label
    task's per-label thresholds). `view_logits` gives the views' logits without an eager pass (the feature engine)."""
    count = tta.VIEWS["dihedral"] if tta_choice == "auto" else tta.VIEWS[tta_choice]
    begin = time.perf_counter()
    if view_logits is not None:
        logits = view_logits(val.paths, val.crops, count)  # (N, views, classes)
    else:
        logits = infer_logits(tta.ViewLogits(model, count), val.paths, transform, tta.images_per_batch(count),
                              val.crops)
    seconds_per_view = (time.perf_counter() - begin) / max(1, len(val.paths) * count)
    targets = val.targets.numpy()
    candidates = tta.per_mode(logits, tta.MODES if tta_choice == "auto" else (tta_choice,))
    mode, losses = choose_tta({m: v.numpy() for m, v in candidates.items()}, targets, task.kind)
    temperature = calibration.fit_temperature(candidates[mode].numpy(), targets, task.kind)
    cost = (f" ({tta.VIEWS[mode]} views per image, ~{1000 * seconds_per_view * tta.VIEWS[mode]:.0f} ms per image "
            f"here)" if tta.VIEWS[mode] > 1 else "")
    reporter.log(f"test-time augmentation: {mode}{cost}; calibrating temperature {temperature:.3f}")
    meta: dict = {"tta": mode, "temperature": temperature}
    if tta_choice == "auto":
        meta["tta_selection"] = {"val_loss": losses, "seconds_per_view": seconds_per_view}
    probs = task.probabilities(candidates[mode], temperature).numpy()
    if task.multilabel:
        chosen = multilabel.choose_thresholds(probs, targets)
        meta["thresholds"] = dict(zip(task.classes, chosen.tolist(), strict=True))
    elif len(task.classes) == 2:
        meta.update(operating_point_meta(probs, targets, operating_point, reporter))
    return meta


def choose_tta(mode_logits: dict[str, np.ndarray], targets: np.ndarray, kind: str) -> tuple[str, dict[str, float]]:
    """The mode with the lowest validation loss (each at its own fitted temperature, since averaging views makes
    logits less confident), taking a dearer mode only when it beats the cheaper choice by more than one standard
    error of the per-image difference. Returns the mode and every candidate's loss."""
    per_image = {}
    for mode, logits in mode_logits.items():
        temperature = calibration.fit_temperature(logits, targets, kind)
        per_image[mode] = -calibration.log_likelihoods(logits / temperature, targets, kind)
    order = sorted(per_image, key=lambda m: tta.VIEWS[m])
    best = order[0]
    for mode in order[1:]:
        gain = per_image[best] - per_image[mode]
        standard_error = gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else 0.0
        if gain.mean() > standard_error:
            best = mode
    return best, {mode: float(losses.mean()) for mode, losses in per_image.items()}


def operating_point_meta(probs: np.ndarray, targets: np.ndarray, point: str, reporter: Reporter) -> dict:
    """The threshold of a binary task's operating point, and what it gives on the validation images."""
    threshold = calibration.choose_threshold(probs[:, 1], targets == 1, point)
    if threshold is None:
        return {"operating_point": point, "threshold": None}
    predicted = calibration.decide(probs, threshold)
    recall = [float((predicted[targets == c] == c).mean()) if (targets == c).any() else None for c in (0, 1)]
    reporter.log(f"operating point {point}: threshold {threshold:.4f} on the second class's probability "
                 f"(validation recall {recall[0]:.3f} / {recall[1]:.3f})")
    return {"operating_point": point, "threshold": threshold}
