"""The two stages `Trainer.fine_tune` runs: the new head on the frozen base's cached features, then the top blocks
unfrozen with a much smaller learning rate, smaller still for the pretrained layers."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader

from transferkit.config import TrainConfig
from transferkit.data.loader import ImageDataset, Labelled, make_loader
from transferkit.data.stream import is_sharded, stream_loader
from transferkit.data.transforms import Preprocess
from transferkit.features.cache import ArrayTable, ColumnTable, FeatureTable, cache_root
from transferkit.features.extract import (
    FeatureExtractor,
    View,
    clean_view,
    require_finite,
    symmetry_view,
    view_spec,
)
from transferkit.models.classifier import (
    depth_columns,
    depth_levels,
    evaluate_logits,
    set_depths,
    set_train_mode,
    unfreeze,
)
from transferkit.options import Augment
from transferkit.training.distributed import Ranks, sync_batchnorm
from transferkit.training.exact_head import choose_depths, depth_candidates, fit_linear
from transferkit.training.mixing import mixed
from transferkit.training.optim import build_optimizer, build_scheduler, finetune_groups
from transferkit.training.optional import epoch_order
from transferkit.training.prefix import with_frozen_prefix
from transferkit.training.state import Batches, EpochLog, Scores, Stage, epoch_generator

if TYPE_CHECKING:
    from transferkit.training.trainer import Trainer


def frozen_stage(trainer: Trainer, train: Labelled, val: Labelled, pre: Preprocess,
                 transforms: tuple[Callable, Callable]) -> Stage | None:
    """Stage 1: the backbone's features never change, so compute them once per view and train the head on them.
    None when the head was solved exactly (head_fit exact): nothing is left to train."""
    model, config, ranks = trainer.model, trainer.config, trainer.ranks
    if config.feature_depths == "auto":  # every level extracted once; the set is chosen on validation below
        model.depths = depth_levels(model.backbone)
    views = frozen_views(pre, config.augmentation(), transforms[1], config.views_for(len(train.paths)))
    cache = cache_root(config.cache, config.cache_dir)
    extract = FeatureExtractor(model, config.feature_engine, config.batch_size, config.workers, trainer.reporter, cache)
    trainer.features = extract
    # one table per view; on disk if cached
    begin = time.perf_counter()
    features = shared_tables(extract, ranks, train.paths, views, "features train", train.crops)
    [val_table] = shared_tables(extract, ranks, val.paths, views[:1], "features val", val.crops)
    val_features = torch.from_numpy(val_table.take(np.arange(len(val_table))))
    require_finite(val_features, "validation images")  # where no compiled engine checked them (torch, GPU)
    seconds, who = time.perf_counter() - begin, f" by rank 0 of {ranks.world}" if ranks.distributed else ""
    trainer.reporter.log(f"features: {extract.computed} images through the backbone{who}, the rest from the cache "
                     f"({seconds:.1f} s)" if cache else
                     f"features: {extract.computed} images through the backbone{who} (no cache, {seconds:.1f} s)")
    features, val_features, solved = validated_head(trainer, features, train.targets, val_features, val.targets)
    # The global RNG (dropout) must not depend on how many images the cache supplied, so cached and uncached runs
    # train the same head.
    torch.manual_seed(config.seed)
    if solved:
        record_solved_head(trainer, features, train.targets, (val_features, val.targets), begin)
        return None
    # replicated on every rank (see training.distributed), each taking the global batch
    n_train, batch = len(train.paths), config.batch_size * ranks.world

    def batches(epoch: int, skip: int):
        generator = epoch_generator(config.seed, "frozen", epoch)
        order = epoch_order(train.targets, config.class_balance, generator)
        view = torch.randint(len(views), (n_train,), generator=generator)
        for chunk in order.split(batch)[skip:]:
            yield torch.from_numpy(gather(features, view[chunk].numpy(), chunk.numpy())), train.targets[chunk]

    def validate() -> Scores:
        return loss_and_accuracy(model.head, [(val_features, val.targets)], trainer)

    optimizer = build_optimizer(config.optimizer, [{"params": model.head.parameters(), "lr": config.lr}], config)
    steps = -(-n_train // batch)
    scheduler = build_scheduler(optimizer, config, -(-steps // config.accumulate), config.epochs_frozen)
    # on a CPU, one thread: the head's ops are too small to share (on a busy 2-core machine 2 threads were 15x slower)
    return Stage("frozen", model.head, model.head.train, optimizer, scheduler, batches, n_train, validate,
                 config.epochs_frozen, steps, threads=1 if trainer.compute.device.type == "cpu" else None)


def frozen_views(pre: Preprocess, augment: Augment, augmented: Callable, feature_views: int) -> list[View]:
    """View 0 is the clean image (shared by every recipe, and by auto, doctor and embeddings). With `dihedral`
    augmentation the others are the 7 other symmetries of the square, with `flip` the mirror image, exactly (the
    test-time views too); else `feature_views - 1` randomly augmented copies, none when nothing is augmented."""
    if augment.exact_symmetries:
        return [symmetry_view(pre, augment.samplewise_center, k) for k in range(augment.exact_symmetries)]
    views = [clean_view(pre, augment.samplewise_center)]
    augmented_spec = {**view_spec(pre, augment.samplewise_center), "augment": dataclasses.asdict(augment)}
    n_views = 1 if augment.is_identity else feature_views
    return views + [View(k, augmented, {**augmented_spec, "view": k}) for k in range(1, n_views)]


def validated_head(trainer: Trainer, features: list[FeatureTable], train_y: torch.Tensor, val_x: torch.Tensor,
                   val_y: torch.Tensor) -> tuple[list[FeatureTable], torch.Tensor, bool]:
    """The choices stage 1 makes on the validation images: the depth set (feature_depths auto, Head2Toe-style) and
    the exact linear head (head_fit exact, single-label only; hidden layers keep SGD). Returns the training tables
    and validation features of the chosen depths, and whether the head is solved."""
    model, config = trainer.model, trainer.config
    exact = config.solves_head and train_y.dim() == 1
    auto = config.feature_depths == "auto"
    if not (exact or auto):
        return features, val_x, False
    # every view's rows train the head (the augmented views are more examples of the same image)
    x = np.concatenate([table.take(np.arange(len(table))) for table in features])
    y, val = np.tile(train_y.numpy(), len(features)), (val_x.numpy(), val_y.numpy())
    outputs = model.head[-1].out_features
    weights = trainer.task.class_weights(train_y).numpy() if config.class_balance != "none" else None
    if auto:
        computed = model.depths
        columns = {d: depth_columns(model.backbone, computed, d) for d in depth_candidates(computed)}
        # The depth set is compared on the clean view's rows (the augmented views multiply the cost, not the
        # evidence); its head is then solved on every view's rows.
        clean = len(features[0])
        depths, fit = choose_depths(columns, x[:clean], y[:clean], *val, outputs, weights)
        chosen = columns[depths]
        if exact and len(features) > 1:
            fit = fit_linear(x[:, chosen], y, val[0][:, chosen], val[1], outputs, class_weights=weights)
        torch.manual_seed(config.seed)  # the new head's initial weights must not depend on what the cache supplied
        set_depths(model, depths)
        features, val_x = [ColumnTable(table, chosen) for table in features], val_x[:, chosen]
        trainer.reporter.log(f"feature depths: levels {list(model.depths) or 'none'} + last layer, chosen on "
                             f"validation of {len(columns)} sets")
    elif exact:
        fit = fit_linear(x, y, *val, outputs, class_weights=weights)
    if exact:
        fit.load_into(model.head[-1])
        trainer.reporter.log(f"frozen head: exact logistic regression on standardised features, C = {fit.C:g} "
                             "(lowest validation loss)")
    return features, val_x, exact


def record_solved_head(trainer: Trainer, features: list[FeatureTable], train_y: torch.Tensor,
                       val: tuple[torch.Tensor, torch.Tensor], begin: float) -> None:
    """One history row for the solved head (its loss and accuracy on the clean training view and on validation),
    which early stopping keeps as the best so far: fine-tuning must beat it to replace it."""
    head = trainer.model.head
    clean = torch.from_numpy(features[0].take(np.arange(len(features[0]))))
    fitted, validated = loss_and_accuracy(head, [(clean, train_y)], trainer), loss_and_accuracy(head, [val], trainer)
    trainer.reporter.log(f"frozen head solved: loss {fitted.loss:.4f} acc {fitted.acc:.3f} | val loss "
                         f"{validated.loss:.4f} acc {validated.acc:.3f} balanced {validated.balanced_acc:.3f}")
    trainer.keeper.start_stage()
    trainer.fire("after_epoch", EpochLog.validated(1, "frozen", fitted.loss, fitted.acc, validated, 0.0,
                                                   time.perf_counter() - begin))


def shared_tables(extract: FeatureExtractor, ranks: Ranks, paths: list[str], views: list[View], description: str,
                  crops: list | None) -> list[FeatureTable]:
    """Feature tables of all `paths`, each rank computing its share: through the cache when it is on (after the
    barrier every row is there, on one machine; on several without a shared cache the rest is computed
    locally), else gathered over the process group."""
    if not ranks.distributed:
        return extract.tables(paths, views, description, crops)
    mine = extract.tables(ranks.mine(paths), views, description, ranks.mine(crops) if crops else None)
    if extract.cache_root:
        ranks.barrier()
        return extract.tables(paths, views, description, crops)
    return [ArrayTable(ranks.gather_rows(torch.from_numpy(t.take(np.arange(len(t))))).numpy()) for t in mine]


def gather(tables: list[FeatureTable], views: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Row rows[i] of view views[i], for each i: one batch of stage 1, read from the view tables."""
    parts = {view: tables[view].take(rows[views == view]) for view in np.unique(views).tolist()}
    out = np.empty((len(rows), next(iter(parts.values())).shape[1]), dtype=np.float32)
    for view, part in parts.items():
        out[views == view] = part
    return out


def unfrozen_stage(trainer: Trainer, train: Labelled, val: Labelled, pre: Preprocess,
                   transforms: tuple[Callable, Callable]) -> Stage:
    """Stage 2: unfreeze all or the top blocks; lower learning rate, lower still for the pretrained layers. With
    several ranks: DDP, each rank taking its piece of every global batch and of the validation images."""
    model, config, ranks = trainer.model, trainer.config, trainer.ranks
    clean, augmented = transforms
    if config.sync_bn and ranks.distributed:  # before the optimizer is built: the layers are replaced
        sync_batchnorm(model, ranks)
    groups = finetune_groups(model, unfreeze(model, config.unfreeze), config)
    optimizer = build_optimizer(config.finetune_optimizer or config.optimizer, groups, config)
    val_mine = ImageDataset(ranks.mine(val.paths), ranks.mine(val.targets), clean,
                            crops=ranks.mine(val.crops) if val.crops else None)
    batch = config.batch_size
    batches, steps = (streamed_batches if is_sharded(train) else indexed_batches)(train, augmented, config, ranks)
    batches = mixed(batches, config, trainer.task)  # mixup / CutMix, when on
    # the frozen stem and lower blocks on the inference engine, only the unfrozen top in autograd (training.prefix)
    module = with_frozen_prefix(model, config.feature_engine, trainer.reporter)

    def validate() -> Scores:
        logits, targets = evaluate_logits(module, make_loader(val_mine, batch, config.workers))
        return scored(ranks.gather_rows(logits), ranks.gather_rows(targets), trainer)

    scheduler = build_scheduler(optimizer, config, -(-steps // config.accumulate), config.epochs_finetune)
    return Stage("finetune", ranks.wrap(module), lambda: set_train_mode(model, config.finetune_bn), optimizer,
                 scheduler, batches, len(train.paths), validate, config.epochs_finetune, steps,
                 sharded=ranks.distributed)


def indexed_batches(train: Labelled, augmented: Callable, config: TrainConfig, ranks: Ranks
                    ) -> tuple[Batches, int]:
    """Fine-tuning batches of image files (or shard members) read by index, and how many per epoch: the order
    and each image's augmentation come from the epoch's seed, not from a generator carried across epochs or from
    the workers, so a resumed epoch replays the same batches and skips the done ones without reading them."""
    n_train, batch = len(train.paths), config.batch_size

    def batches(epoch: int, skip: int):
        generator = epoch_generator(config.seed, "finetune", epoch)
        order = ranks.pad(epoch_order(train.targets, config.class_balance, generator))
        seeds = torch.randint(2**31, (n_train,), generator=generator).tolist()
        order = torch.cat([ranks.piece(chunk) for chunk in order.split(batch * ranks.world)])
        dataset = ImageDataset(train.paths, train.targets, augmented, seeds, train.crops)
        for images, targets in make_loader(dataset, batch, config.workers, order[skip * batch:].tolist()):
            yield images.contiguous(memory_format=torch.channels_last), targets

    return batches, -(-len(ranks.pad(torch.arange(n_train))) // (batch * ranks.world))


def streamed_batches(train: Labelled, augmented: Callable, config: TrainConfig, ranks: Ranks
                     ) -> tuple[Batches, int]:
    """Fine-tuning batches streamed from packed shards (`transferkit pack`): each rank (and loader worker) reads
    its own shards front to back through a shuffle buffer, so memory stays flat however large the data. The
    epoch's stream is a function of (seed, epoch, rank, world, workers): a resumed epoch replays it, decoding
    (not training on) the batches it skips. Batches per epoch are counted on the first epoch's shard split."""

    def loader(epoch: int) -> DataLoader:
        return stream_loader(train, "train", augmented, config.batch_size, config.workers, seed=config.seed,
                             epoch=epoch, rank=ranks.rank, world=ranks.world, shuffle_buffer=config.shuffle_buffer)

    def batches(epoch: int, skip: int):
        for images, targets in itertools.islice(loader(epoch), skip, None):
            yield images.contiguous(memory_format=torch.channels_last), targets

    # a loader's workers batch their own streams: each ends with its own partial batch
    stream, units = loader(1).dataset, max(1, config.workers)
    return batches, sum(-(-len(stream.unit_order(ranks.rank, ranks.world, worker, units)) // config.batch_size)
                        for worker in range(units))


def loss_and_accuracy(module: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      trainer: Trainer) -> Scores:
    """The task's loss, mean hits and balanced accuracy of `module` over evaluation batches."""
    return scored(*evaluate_logits(module, batches), trainer)


def scored(logits: torch.Tensor, targets: torch.Tensor, trainer: Trainer) -> Scores:
    task = trainer.task
    return Scores(float(trainer.criterion(logits, targets)), float(task.hits(logits, targets).mean()),
                  task.balanced_accuracy(logits, targets))
