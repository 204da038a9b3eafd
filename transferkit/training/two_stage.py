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
from transferkit.data.loader import ImageDataset, Labelled, make_loader
from transferkit.data.transforms import Preprocess, eval_transform, train_transform
from transferkit.features import FeatureExtractor, View, clean_view, view_spec
from transferkit.models.classifier import Classifier, freeze_backbone, set_train_mode, unfreeze
from transferkit.progress import Reporter
from transferkit.training.checkpoint import Checkpoints
from transferkit.training.compute import Compute
from transferkit.training.loop import (
    BestKeeper,
    EpochLog,
    FitContext,
    Stage,
    StepLog,
    epoch_generator,
    evaluate_logits,
    fit,
    loss_and_accuracy,
    loss_fn,
    single_label_hits,
)
from transferkit.training.optim import build_optimizer, build_scheduler


def frozen_stage(model: Classifier, train: Labelled, val: Labelled, pre: Preprocess,
                 transforms: tuple[Callable, Callable], config: TrainConfig, ctx: FitContext) -> Stage:
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

    def batches(epoch: int, skip: int):
        generator = epoch_generator(config.seed, "frozen", epoch)
        order = torch.randperm(n_train, generator=generator)
        view = torch.randint(n_views, (n_train,), generator=generator)
        for chunk in order.split(config.batch_size)[skip:]:
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
                   config: TrainConfig, ctx: FitContext) -> Stage:
    """Stage 2: unfreeze all or the top blocks; lower learning rate, lower still for the pretrained layers."""
    clean, augmented = transforms
    backbone_params = unfreeze(model, config.unfreeze)
    groups = [{"params": list(model.head.parameters()), "lr": config.finetune_lr},
              {"params": backbone_params, "lr": config.finetune_lr * config.backbone_lr_mult}]
    optimizer = build_optimizer(config.finetune_optimizer or config.optimizer, groups, config)
    val_loader = make_loader(val.dataset(clean), config.batch_size, config.workers)
    n_train, batch = len(train.paths), config.batch_size

    def batches(epoch: int, skip: int):
        # The order and each image's augmentation this epoch come from the epoch's seed, not from a generator
        # carried across epochs or from the workers: a resumed epoch replays the same batches.
        generator = epoch_generator(config.seed, "finetune", epoch)
        order = torch.randperm(n_train, generator=generator)
        seeds = torch.randint(2**31, (n_train,), generator=generator).tolist()
        dataset = ImageDataset(train.paths, train.targets, augmented, seeds, train.crops)
        for images, targets in make_loader(dataset, batch, config.workers, order[skip * batch:].tolist()):
            yield images.contiguous(memory_format=torch.channels_last), targets

    def validate() -> tuple[float, float]:
        return loss_and_accuracy(*evaluate_logits(model, val_loader), ctx.criterion, ctx.hits)

    steps = -(-n_train // batch)
    scheduler = build_scheduler(optimizer, config, -(-steps // config.accumulate), config.epochs_finetune)
    return Stage("finetune", model, lambda: set_train_mode(model, config.finetune_bn), optimizer, scheduler,
                 batches, n_train, validate, config.epochs_finetune, steps)


def fine_tune(model: Classifier, train: Labelled, val: Labelled, pre: Preprocess, config: TrainConfig,
              keeper: BestKeeper, reporter: Reporter, on_epoch: Callable[[EpochLog], None], compute: Compute,
              on_step: Callable[[StepLog], None] | None = None, is_multilabel: bool = False,
              checkpoints: Checkpoints | None = None) -> None:
    """Both stages; on return (or Ctrl-C, caught by the caller) `keeper` holds the best weights seen. With a loaded
    checkpoint, stages it finished are skipped and its own stage goes on from where it was taken."""
    if is_multilabel:
        criterion, hits = multilabel.loss(config.label_smoothing), multilabel.hits
    else:
        binary = model.head[-1].out_features == 1
        criterion, hits = loss_fn(binary, config.label_smoothing), single_label_hits(binary)
    ctx = FitContext(criterion, hits, keeper, model, reporter, on_epoch, compute, on_step, checkpoints)
    augment = config.augmentation()
    transforms = (eval_transform(pre, augment.samplewise_center), train_transform(pre, augment))
    model.to(memory_format=torch.channels_last)
    freeze_backbone(model)
    resume = checkpoints.position if checkpoints else None
    for name, epochs in (("frozen", config.epochs_frozen), ("finetune", config.epochs_finetune)):
        if not epochs or (resume and resume.after(name)):
            continue
        resuming = resume is not None and resume.stage == name
        if resuming and resume.stage_over:  # it ended at its last checkpoint: only the best-weights restore is left
            checkpoints.restore_model(ctx)
            keeper.restore(model)
            continue
        if name == "frozen":
            stage = frozen_stage(model, train, val, pre, transforms, config, ctx)
            # Re-seed after feature extraction: the global RNG (dropout) must not depend on how many images the
            # cache supplied, so cached and uncached runs train the same head.
            torch.manual_seed(config.seed)
        else:
            stage = finetune_stage(model, train, val, transforms, config, ctx)
        if resuming:
            checkpoints.restore_model(ctx)
            checkpoints.restore_stage(stage, ctx)
            reporter.log(f"resuming {name} epoch {resume.epoch} after {resume.step} of {stage.steps} batches")
        fit(stage, ctx, resume if resuming else None)
    model.requires_grad_(False)
