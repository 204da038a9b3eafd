"""fastai's fine_tune, as its description reads: train the new head on a frozen base, then unfreeze and train
everything (or the top blocks) with a much smaller learning rate, smaller still for the pretrained layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from transferkit.config import TrainConfig
from transferkit.data.loader import ImageDataset, make_loader
from transferkit.data.transforms import Preprocess, eval_transform, train_transform
from transferkit.models.classifier import Classifier, freeze_backbone, set_train_mode, unfreeze
from transferkit.progress import Reporter
from transferkit.train.loop import BestKeeper, EpochLog, evaluate_logits, fit, loss_and_accuracy, loss_fn
from transferkit.train.optim import build_optimizer, build_scheduler


@torch.inference_mode()
def extract_embeddings(
    model: Classifier,
    paths: Sequence[str],
    transform: Callable,
    batch_size: int,
    workers: int,
    reporter: Reporter,
    description: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pooled backbone features of each image (backbone in inference mode: frozen BN statistics)."""
    model.eval()
    loader = make_loader(ImageDataset(paths, None, transform), batch_size, workers, generator=generator)
    chunks = []
    with reporter.bar(description, len(paths)) as advance:
        for images, _ in loader:
            chunks.append(model.embed(images.contiguous(memory_format=torch.channels_last)))
            advance(images.shape[0])
    return torch.cat(chunks) if chunks else torch.empty(0, model.num_features)


def fine_tune(
    model: Classifier,
    train_set: tuple[list[str], list[int]],
    val_set: tuple[list[str], list[int]],
    pre: Preprocess,
    config: TrainConfig,
    keeper: BestKeeper,
    reporter: Reporter,
    on_epoch: Callable[[EpochLog], None],
) -> None:
    """Both stages; on return (or Ctrl-C, caught by the caller) `keeper` holds the best weights seen."""
    binary = model.head[-1].out_features == 1
    criterion = loss_fn(binary, config.label_smoothing)
    augment = config.augmentation()
    clean, augmented = eval_transform(pre, augment.samplewise_center), train_transform(pre, augment)
    generator = torch.Generator().manual_seed(config.seed)
    (train_paths, train_y), (val_paths, val_y) = train_set, val_set
    train_targets, val_targets = torch.tensor(train_y), torch.tensor(val_y)
    model.to(memory_format=torch.channels_last)

    # Stage 1: frozen backbone. Its features never change, so compute them once per view and train the head on them.
    freeze_backbone(model)
    if config.epochs_frozen:
        views = 1 if augment.is_identity else config.feature_views
        view_features = [
            extract_embeddings(
                model,
                train_paths,
                clean if v == 0 else augmented,
                config.batch_size,
                config.workers,
                reporter,
                f"features view {v + 1}/{views}",
                generator,
            )
            for v in range(views)
        ]
        train_features = torch.stack(view_features)  # (views, N, D)
        val_features = extract_embeddings(
            model, val_paths, clean, config.batch_size, config.workers, reporter, "features val"
        )

        def head_batches():
            order = torch.randperm(len(train_paths), generator=generator)
            view = torch.randint(views, (len(train_paths),), generator=generator)
            for chunk in order.split(config.batch_size):
                yield train_features[view[chunk], chunk], train_targets[chunk]

        def validate_head() -> tuple[float, float]:
            return loss_and_accuracy(*evaluate_logits(model.head, [(val_features, val_targets)]), criterion, binary)

        optimizer = build_optimizer(config.optimizer, [{"params": model.head.parameters(), "lr": config.lr}], config)
        steps = -(-len(train_paths) // config.batch_size)
        fit(
            "frozen",
            model.head,
            model.head.train,
            optimizer,
            build_scheduler(optimizer, config, steps, config.epochs_frozen),
            head_batches,
            len(train_paths),
            validate_head,
            config.epochs_frozen,
            criterion,
            binary,
            keeper,
            model,
            reporter,
            on_epoch,
        )
        keeper.restore(model)

    # Stage 2: unfreeze all or the top blocks; lower learning rate, lower still for the pretrained layers.
    if config.epochs_finetune:
        backbone_params = unfreeze(model, config.unfreeze)
        groups = [
            {"params": list(model.head.parameters()), "lr": config.finetune_lr},
            {"params": backbone_params, "lr": config.finetune_lr * config.backbone_lr_mult},
        ]
        optimizer = build_optimizer(config.finetune_optimizer or config.optimizer, groups, config)
        train_loader = make_loader(
            ImageDataset(train_paths, train_y, augmented),
            config.batch_size,
            config.workers,
            shuffle=True,
            generator=generator,
        )
        val_loader = make_loader(ImageDataset(val_paths, val_y, clean), config.batch_size, config.workers)

        def image_batches():
            for images, targets in train_loader:
                yield images.contiguous(memory_format=torch.channels_last), targets

        def validate_model() -> tuple[float, float]:
            return loss_and_accuracy(*evaluate_logits(model, val_loader), criterion, binary)

        fit(
            "finetune",
            model,
            lambda: set_train_mode(model, config.finetune_bn),
            optimizer,
            build_scheduler(optimizer, config, len(train_loader), config.epochs_finetune),
            image_batches,
            len(train_paths),
            validate_model,
            config.epochs_finetune,
            criterion,
            binary,
            keeper,
            model,
            reporter,
            on_epoch,
        )
        keeper.restore(model)
    model.requires_grad_(False)
