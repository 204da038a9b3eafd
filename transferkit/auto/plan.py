"""How much to unfreeze and how many epochs fit the time budget, from measured per-image speeds."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from transferkit.config import TrainConfig
from transferkit.models.classifier import Classifier, backbone_groups, freeze_backbone, set_train_mode, unfreeze
from transferkit.progress import Reporter
from transferkit.training.prefix import with_frozen_prefix

# Fewer training images than N -> unfreeze the top K coarse blocks: little data overfits a deeply fine-tuned network
# (decision 0220, as are the three constants below).
UNFREEZE_BY_TRAIN_IMAGES = ((500, 1), (10000, 3), (50000, 5))
# The most fine-tuning epochs a plan buys (unless the config names a number): the validation loss bottoms out as the
# cosine schedule anneals, and a longer plan overfits while its rate is still high.
MAX_FINETUNE_EPOCHS = 5
# Fine-tuning epochs that probing one more backbone may not eat into: fewer do not get past the frozen head's loss.
RESERVED_EPOCHS = 4
# Fine-tuning epochs each of the two finalists trains before the cut (auto.race), on the same schedule so their
# scores compare: fine-tuning first climbs above the frozen head's loss, and two epochs were noise.
RACE_EPOCHS = 3
SAFETY = 1.25  # estimates leave out image decoding and Python overhead: plan with a quarter more time
REPORT_SECONDS = 10.0  # report.html: Grad-CAM and similarity on a few images
TIMING_BATCH = 8  # images per timed step: per-image cost is what matters, and a small batch costs little to time


def most_finetune_epochs(config: TrainConfig) -> int:
    """The most fine-tuning epochs a plan may buy: the config's number (0 where auto() found that fine-tuning does
    not pay, decision 0304), MAX_FINETUNE_EPOCHS for auto."""
    return MAX_FINETUNE_EPOCHS if config.epochs_finetune == "auto" else int(config.epochs_finetune)


def race_epochs(config: TrainConfig) -> int:
    """Fine-tuning epochs each finalist trains in the race: none when the plan buys none (a race of frozen stages)."""
    return min(RACE_EPOCHS, most_finetune_epochs(config))


def reserved_epochs(config: TrainConfig) -> int:
    """Fine-tuning epochs that probing may not eat into: none when the plan buys none."""
    return min(RESERVED_EPOCHS, most_finetune_epochs(config))


def unfreeze_rule(train_images: int, blocks: int) -> str:
    """The number of top blocks to fine-tune (as TrainConfig.unfreeze), by dataset size, at most all of them."""
    for limit, count in UNFREEZE_BY_TRAIN_IMAGES:
        if train_images < limit:
            return str(min(count, blocks))
    return "all"


def count_blocks(model: Classifier) -> int:
    return len(backbone_groups(model.backbone))


@dataclass(frozen=True)
class Speeds:
    """Seconds per image, measured on this machine."""

    inference: float  # the frozen backbone, forward only (features, validation, evaluation)
    finetune: float  # forward and backward with the top blocks unfrozen (0 where nothing is fine-tuned)
    head: float  # one head training step on cached features (from the lr-find)


def measure_speeds(model: Classifier, blocks: str, image_size: int, config: TrainConfig, head: float) -> Speeds:
    """Time a synthetic batch: the forward pass in eager PyTorch (the feature engine, used for features when it is
    faster, only makes the real run quicker than planned), the training step as stage 2 runs it (its frozen lower
    blocks compiled where training.prefix compiles them). Where the config fine-tunes nothing the training step is
    not timed (compiling its prefix alone takes seconds) and costs 0 in the plans."""
    device = next(model.parameters()).device
    images = torch.randn(min(TIMING_BATCH, config.batch_size), 3, image_size, image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last)
    freeze_backbone(model)

    def forward() -> None:
        model.eval()
        with torch.inference_mode():
            model.embed(images)

    per_image = len(images)
    inference = best_time(forward, device) / per_image
    if config.epochs_finetune == 0:
        return Speeds(inference, 0.0, head)
    unfreeze(model, blocks)
    stage2 = with_frozen_prefix(model, config.feature_engine, Reporter(quiet=True))

    def train_step() -> None:
        set_train_mode(model, config.finetune_bn)
        model.zero_grad(set_to_none=True)
        stage2(images).float().sum().backward()

    return Speeds(inference, best_time(train_step, device) / per_image, head)


def best_time(step: Callable[[], None], device: torch.device, repeats: int = 2) -> float:
    """The fastest of `repeats` timed calls after one warm-up call (allocations, kernel selection)."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


@dataclass(frozen=True)
class Workload:
    train: int  # training images
    val: int
    evaluated: int  # images of the split the final metrics are computed on
    uncached: int  # train and val images whose clean-view features are not in the cache yet


@dataclass(frozen=True)
class Plan:
    epochs_finetune: int
    feature_views: int
    estimated_seconds: float  # training, evaluation and report, SAFETY included

    def to_json(self) -> dict:
        return {"epochs_finetune": self.epochs_finetune, "feature_views": self.feature_views,
                "estimated_seconds": round(self.estimated_seconds, 1)}


def plan_training(seconds_left: float, work: Workload, speeds: Speeds, config: TrainConfig) -> Plan:
    """Spend `seconds_left` in this order: the minimum (missing clean features, the head's epochs, evaluation, the
    report), then fine-tuning epochs up to `most_finetune_epochs`, then, only from what is left after those, augmented
    feature views (up to the config's).

    Fine-tuning comes before augmented views because it is what moves accuracy (decision 0220). Views only vary the
    frozen stage's inputs, and the best weights of both stages are kept, so a view that costs a fine-tuning epoch
    mostly buys a better start for weights that fine-tuning then replaces. When even the minimum does not fit, the
    plan is the minimum (no fine-tuning)."""
    epoch = epoch_seconds(work, speeds)
    minimum = fixed_seconds(work, speeds, config, 1)
    ceiling = most_finetune_epochs(config)
    fitting = max(0, min(ceiling, math.floor((seconds_left - minimum) / epoch)))
    epochs = max(fitting, 0 if config.epochs_frozen else 1)  # a run with no head epochs must fine-tune at least once
    views = 1
    if epochs == ceiling and not config.augmentation().is_identity:
        spare = seconds_left - epochs * epoch
        most = config.views_for(work.train)
        views = max([v for v in range(1, most + 1) if fixed_seconds(work, speeds, config, v) <= spare], default=1)
    return Plan(epochs, views, training_seconds(work, speeds, config, views, epochs))


def plan_race(seconds_left: float, work: Workload, speeds: list[Speeds], config: TrainConfig) -> list[Plan]:
    """Plans for the finalists (speeds[i] is finalist i's) when racing them leaves each at least `reserved_epochs`
    fine-tuning epochs, with the other's part of the race (its frozen stage and `race_epochs`) paid out of the
    budget (a plan that buys no fine-tuning races the frozen stages, when both fit); the same epochs for both, so
    that their schedules, and so their race scores, compare. Otherwise the first finalist's plan alone: no race.
    With `ensemble` on, both finalists finish their runs, so both are paid for in full."""
    alone = [plan_training(seconds_left, work, s, config) for s in speeds]
    if len(speeds) < 2:
        return alone
    if config.ensemble:
        return plans_for_both(seconds_left, work, speeds, alone, config)
    costs = [training_seconds(work, s, config, p.feature_views, race_epochs(config))
             for s, p in zip(speeds, alone, strict=True)]
    shared = [plan_training(seconds_left - costs[1 - i], work, s, config) for i, s in enumerate(speeds)]
    epochs = min(p.epochs_finetune for p in shared)
    fits = all(p.estimated_seconds + costs[1 - i] <= seconds_left for i, p in enumerate(shared))
    if epochs < reserved_epochs(config) or not fits:
        return alone[:1]
    return [Plan(epochs, p.feature_views, training_seconds(work, s, config, p.feature_views, epochs))
            for s, p in zip(speeds, shared, strict=True)]


def plans_for_both(seconds_left: float, work: Workload, speeds: list[Speeds], alone: list[Plan],
                   config: TrainConfig) -> list[Plan]:
    """The most fine-tuning epochs, the same for both finalists and at least `reserved_epochs`, whose two whole runs
    fit in `seconds_left` together; else the first finalist's plan alone."""
    def both(epochs: int) -> list[Plan]:
        return [Plan(epochs, plan.feature_views, training_seconds(work, s, config, plan.feature_views, epochs))
                for s, plan in zip(speeds, alone, strict=True)]

    fitting = [epochs for epochs in range(reserved_epochs(config), most_finetune_epochs(config) + 1)
               if sum(plan.estimated_seconds for plan in both(epochs)) <= seconds_left]
    return both(max(fitting)) if fitting else alone[:1]


def epoch_seconds(work: Workload, speeds: Speeds) -> float:
    """One fine-tuning epoch: the training images forward and backward, the validation images forward."""
    return SAFETY * (work.train * speeds.finetune + work.val * speeds.inference)


def reserve_seconds(work: Workload, speeds: Speeds, config: TrainConfig) -> float:
    """What probing another backbone must leave: the plan's minimum and `reserved_epochs` of fine-tuning."""
    return fixed_seconds(work, speeds, config, 1) + reserved_epochs(config) * epoch_seconds(work, speeds)


def training_seconds(work: Workload, speeds: Speeds, config: TrainConfig, views: int, epochs: int) -> float:
    """A run with `views` and `epochs` of fine-tuning, evaluated and reported (with `race_epochs`: a finalist's
    part of the race)."""
    return fixed_seconds(work, speeds, config, views) + epochs * epoch_seconds(work, speeds)


def fixed_seconds(work: Workload, speeds: Speeds, config: TrainConfig, views: int) -> float:
    """The frozen stage (features still missing, augmented views, head epochs over every view), evaluation and the
    report, SAFETY included."""
    features = (work.uncached + work.train * (views - 1)) * speeds.inference
    head = config.epochs_frozen * work.train * views * speeds.head
    evaluation = work.evaluated * speeds.inference
    return SAFETY * (features + head + evaluation) + REPORT_SECONDS
