"""The learning-rate range test (Smith 2015, fastai's lr_find) for the head on frozen features.

A throwaway head trains for up to STEPS mini-batches while the learning rate grows exponentially from START_LR to
END_LR; the loss is smoothed (exponential moving average, debiased) and the test stops once it explodes. The
suggestion is the steepest descent: the learning rate where the smoothed loss falls fastest per decade, before its
minimum. The other classic rule, the minimum's learning rate / 10, fails for a head on frozen features: with fewer
images than feature dimensions the classes are separable, the loss never explodes, and its minimum is the last
rate tried (decision 0222).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
import torch  # noqa: E402

from transferkit.config import TrainConfig  # noqa: E402
from transferkit.fileio import atomic_path  # noqa: E402
from transferkit.models.classifier import build_head  # noqa: E402
from transferkit.task.kinds import task_for  # noqa: E402
from transferkit.training.optim import build_optimizer  # noqa: E402

START_LR, END_LR, STEPS = 1e-7, 10.0, 100
SMOOTHING = 0.98  # weight of the running average: about the last 50 batches
EXPLODED = 4.0  # stop when the smoothed loss is this many times its minimum
SKIP_START = 10  # the first points average only a few batches: too noisy for a slope or a minimum
RATE_FRACTIONS = (1.0, 0.3, 0.1, 0.03, 0.01)  # of the suggestion, tried by `best_rate`


@dataclass(frozen=True)
class LRFind:
    lrs: list[float]
    losses: list[float]  # smoothed training loss at each learning rate
    suggested_lr: float
    seconds_per_image: float  # one training step of the head, per image: what a head epoch costs

    def to_json(self) -> dict:
        return {"suggested_lr": self.suggested_lr, "lrs": self.lrs, "losses": self.losses}


def new_head(dim: int, num_classes: int, config: TrainConfig, lr: float):
    """A fresh head of the config's shape, its loss and its optimizer at `lr` (seeded: every call starts alike)."""
    torch.manual_seed(config.seed)
    task = task_for([str(c) for c in range(num_classes)], False, config.binary_logit)
    head = build_head(dim, task.outputs, config.head_spec()).train()
    optimizer = build_optimizer(config.optimizer, [{"params": head.parameters(), "lr": lr}], config)
    return head, task.loss(config.label_smoothing), optimizer


def lr_find(features: np.ndarray, targets: np.ndarray, num_classes: int, config: TrainConfig,
            start_lr: float = START_LR, end_lr: float = END_LR, steps: int = STEPS) -> LRFind:
    """Range test of the config's head and optimizer on (N, D) features with class-index targets."""
    head, criterion, optimizer = new_head(features.shape[1], num_classes, config, start_lr)
    growth = torch.optim.lr_scheduler.ExponentialLR(optimizer, (end_lr / start_lr) ** (1 / max(1, steps - 1)))
    lrs: list[float] = []
    losses: list[float] = []
    average, start = 0.0, time.perf_counter()
    for step, (inputs, labels) in enumerate(batches(features, targets, config.batch_size, steps, config.seed), 1):
        loss = criterion(head(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        growth.step()
        average = SMOOTHING * average + (1 - SMOOTHING) * loss.item()
        losses.append(average / (1 - SMOOTHING**step))
        if not math.isfinite(losses[-1]) or losses[-1] > EXPLODED * min(losses):
            break
    per_image = (time.perf_counter() - start) / (len(lrs) * min(config.batch_size, len(targets)))
    return LRFind(lrs, losses, steepest_descent(lrs, losses), per_image)


def best_rate(features: np.ndarray, targets: np.ndarray, num_classes: int, config: TrainConfig,
              suggestion: float) -> tuple[float, dict[float, float]]:
    """The rate, among the range test's suggestion and fractions of it, whose head reaches the lowest held-out loss
    in the frozen stage's epochs. The suggestion alone is where the loss falls fastest over a hundred steps, which
    can be too fast for thirty epochs (decision 0222)."""
    train, held_out = holdout_split(targets, config.seed)
    losses = {}
    for rate in (suggestion * f for f in RATE_FRACTIONS):
        head, criterion, optimizer = new_head(features.shape[1], num_classes, config, rate)
        steps = config.epochs_frozen * -(-len(train) // config.batch_size)
        best = math.inf
        for step, (inputs, labels) in enumerate(batches(features[train], targets[train], config.batch_size, steps,
                                                        config.seed), 1):
            optimizer.zero_grad(set_to_none=True)
            criterion(head(inputs), labels).backward()
            optimizer.step()
            if step % -(-len(train) // config.batch_size) == 0:  # an epoch's end: early stopping would look here
                with torch.no_grad():
                    held = criterion(head(torch.from_numpy(features[held_out])), torch.as_tensor(targets[held_out]))
                best = min(best, float(held))
        losses[rate] = best
    return min(losses, key=lambda rate: losses[rate]), losses


def holdout_split(targets: np.ndarray, seed: int, fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified (train rows, held-out rows)."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(targets))
    train, held_out = train_test_split(rows, test_size=fraction, stratify=targets, random_state=seed)
    return np.sort(train), np.sort(held_out)


def steepest_descent(lrs: list[float], losses: list[float]) -> float:
    """The learning rate of the most negative slope of loss against log(lr) in the descent: after the loss last
    stood at its starting level (the median of the first quarter before the minimum), up to its minimum. The first
    points, averages of a few batches, are left out: their noise would otherwise pass for the steepest slope."""
    finite = np.array([loss if math.isfinite(loss) else np.inf for loss in losses])
    first = SKIP_START if len(finite) > 4 * SKIP_START else 0
    lowest = first + int(np.argmin(finite[first:]))
    plateau = np.median(finite[first : max(first + 1, first + (lowest - first) // 4)])
    at_plateau = np.nonzero(finite[first:lowest] >= plateau)[0]
    begin = first + (int(at_plateau[-1]) if len(at_plateau) else 0)
    if lowest - begin < 2:  # no descent to measure
        return lrs[lowest]
    slopes = np.gradient(finite[begin : lowest + 1], np.log10(lrs[begin : lowest + 1]))
    return lrs[begin + int(np.argmin(slopes))]


def batches(features: np.ndarray, targets: np.ndarray, batch_size: int, steps: int,
            seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` shuffled mini-batches, going round the data as often as it takes."""
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = torch.from_numpy(np.ascontiguousarray(features, np.float32)), torch.as_tensor(targets)
    done = 0
    while True:
        for chunk in torch.randperm(len(labels), generator=generator).split(batch_size):
            if done == steps:
                return
            done += 1
            yield inputs[chunk], labels[chunk]


def plot_lr_find(result: LRFind, path: Path, used: float | None = None, backbone: str | None = None) -> None:
    """Loss against learning rate (log scale), the suggestion marked, and the rate training used where it differs
    (auto picks among fractions of the suggestion), titled with the backbone."""
    fig = lr_find_figure(result, used, backbone)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def lr_find_figure(result: LRFind, used: float | None = None, backbone: str | None = None) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(result.lrs, result.losses, color="#1f64b4")
    ax.axvline(result.suggested_lr, color="#c0392b", linestyle="--",
               label=f"suggested {result.suggested_lr:.2e} (steepest descent)")
    if used is not None:
        ax.axvline(used, color="#1e8449", linewidth=2,
                   label=f"used {used:.2e} (best held-out loss of the rates tried)")
    title = "learning-rate range test" + (f": {backbone}" if backbone else "")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title=title)
    finite = [loss for loss in result.losses if math.isfinite(loss)]
    ax.set_ylim(min(finite) * 0.95, min(max(finite), EXPLODED * min(finite)) * 1.05)  # the explosion off-scale
    ax.legend()
    fig.tight_layout()
    return fig
