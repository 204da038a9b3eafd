"""fastai's fine_tune, as its description reads: train the new head on a frozen base, then unfreeze and train
everything (or the top blocks) with a much smaller learning rate, smaller still for the pretrained layers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from transferkit import multilabel
from transferkit.cache import FeatureTable, cache_root
from transferkit.config import TrainConfig
from transferkit.data.loader import Labelled, make_loader
from transferkit.data.transforms import Preprocess, eval_transform, train_transform
from transferkit.features import FeatureExtractor, View, clean_view, view_spec
from transferkit.models.classifier import Classifier, freeze_backbone, set_train_mode, unfreeze
from transferkit.progress import Reporter
from transferkit.training.compute import Compute
from transferkit.training.loop import (
    BestKeeper,
    EpochLog,
    FitContext,
    Stage,
    StepLog,
    evaluate_logits,
    fit,
    loss_and_accuracy,
    loss_fn,
    single_label_hits,
)
from transferkit.training.optim import build_optimizer, build_scheduler


def frozen_stage(model: Classifier, train: Labelled, val: Labelled, pre: Preprocess,
                 transforms: tuple[Callable, Callable], config: TrainConfig, ctx: FitContext,
                 generator: torch.Generator) -> Stage:
    """Stage 1: the backbone's features never change, so compute them once per view and train the head on them."""
    augmented = transforms[1]
    augment = config.augmentation()
    n_views = 1 if augment.is_identity else config.feature_views
    # view 0 is the clean image (shared by every recipe, and by auto, doctor and embeddings), the others augmented
    views = [clean_view(pre, augment.samplewise_center)]
    augmented_spec = {**view_spec(pre, augment.samplewise_center), "augment": dataclasses.asdict(augment)}
    views += [View(k, augmented, {**augmented_spec, "view": k}) for k in range(1, n_views)]
    cache = cache_root(config.cache, config.cache_dir)
    extract = FeatureExtractor(model, config.feature_engine, config.batch_size, config.workers, ctx.reporter, cache)
    features = extract.tables(train.paths, views, "features train", train.crops)  # one per view; on disk if cached
    [val_features] = extract(val.paths, views[:1], "features val", val.crops)
    ctx.reporter.log(f"features: {extract.computed} images through the backbone, the rest from the cache"
                     if cache else f"features: {extract.computed} images through the backbone (no cache)")
    n_train = len(train.paths)

    def batches():
        order = torch.randperm(n_train, generator=generator)
        view = torch.randint(n_views, (n_train,), generator=generator)
        for chunk in order.split(config.batch_size):
            yield torch.from_numpy(gather(features, view[chunk].numpy(), chunk.numpy())), train.targets[chunk]

    def validate() -> tuple[float, float]:
        return loss_and_accuracy(*evaluate_logits(model.head, [(val_features, val.targets)]), ctx.criterion,
                                 ctx.hits)

    optimizer = build_optimizer(config.optimizer, [{"params": model.head.parameters(), "lr": config.lr}], config)
    steps = -(-n_train // config.batch_size)
    scheduler = build_scheduler(optimizer, config, -(-steps // config.accumulate), config.epochs_frozen)
    return Stage("frozen", model.head, model.head.train, optimizer, scheduler, batches, n_train, validate,
                 config.epochs_frozen, steps)


def gather(tables: list[FeatureTable], views: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Row rows[i] of view views[i], for each i: one batch of stage 1, read from the view tables."""
    parts = {view: tables[view].take(rows[views == view]) for view in np.unique(views).tolist()}
    out = np.empty((len(rows), next(iter(parts.values())).shape[1]), dtype=np.float32)
    for view, part in parts.items():
        out[views == view] = part
    return out


def finetune_stage(model: Classifier, train: Labelled, val: Labelled, transforms: tuple[Callable, Callable],
                   config: TrainConfig, ctx: FitContext, generator: torch.Generator) -> Stage:
    """Stage 2: unfreeze all or the top blocks; lower learning rate, lower still for the pretrained layers."""
    clean, augmented = transforms
    backbone_params = unfreeze(model, config.unfreeze)
    groups = [{"params": list(model.head.parameters()), "lr": config.finetune_lr},
              {"params": backbone_params, "lr": config.finetune_lr * config.backbone_lr_mult}]
    optimizer = build_optimizer(config.finetune_optimizer or config.optimizer, groups, config)
    train_loader = make_loader(train.dataset(augmented), config.batch_size, config.workers, shuffle=True,
                               generator=generator)
    val_loader = make_loader(val.dataset(clean), config.batch_size, config.workers)

    def batches():
        for images, targets in train_loader:
            yield images.contiguous(memory_format=torch.channels_last), targets

    def validate() -> tuple[float, float]:
        return loss_and_accuracy(*evaluate_logits(model, val_loader), ctx.criterion, ctx.hits)

    scheduler = build_scheduler(optimizer, config, -(-len(train_loader) // config.accumulate), config.epochs_finetune)
    return Stage("finetune", model, lambda: set_train_mode(model, config.finetune_bn), optimizer, scheduler,
                 batches, len(train.paths), validate, config.epochs_finetune, len(train_loader))


def fine_tune(model: Classifier, train: Labelled, val: Labelled, pre: Preprocess, config: TrainConfig,
              keeper: BestKeeper, reporter: Reporter, on_epoch: Callable[[EpochLog], None], compute: Compute,
              on_step: Callable[[StepLog], None] | None = None, is_multilabel: bool = False) -> None:
    """Both stages; on return (or Ctrl-C, caught by the caller) `keeper` holds the best weights seen."""
    if is_multilabel:
        criterion, hits = multilabel.loss(config.label_smoothing), multilabel.hits
    else:
        binary = model.head[-1].out_features == 1
        criterion, hits = loss_fn(binary, config.label_smoothing), single_label_hits(binary)
    ctx = FitContext(criterion, hits, keeper, model, reporter, on_epoch, compute, on_step)
    augment = config.augmentation()
    transforms = (eval_transform(pre, augment.samplewise_center), train_transform(pre, augment))
    generator = torch.Generator().manual_seed(config.seed)
    model.to(memory_format=torch.channels_last)
    freeze_backbone(model)
    if config.epochs_frozen:
        stage = frozen_stage(model, train, val, pre, transforms, config, ctx, generator)
        # Re-seed after feature extraction: the global RNG (dropout) must not depend on how many images the
        # cache supplied, so cached and uncached runs train the same head.
        torch.manual_seed(config.seed)
        fit(stage, ctx)
    if config.epochs_finetune:
        fit(finetune_stage(model, train, val, transforms, config, ctx, generator), ctx)
    model.requires_grad_(False)
