"""One typed training configuration: defaults <- --recipe <- --config file.yaml <- CLI flags.

Recipes reproduce the classic Keras transfer-learning tutorials; `default` is the best we know for small data.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from transferkit.errors import UserError
from transferkit.fileio import atomic_write
from transferkit.options import (
    AUGMENT_PRESETS,
    DEFAULT_BACKBONE,
    DEVICES,
    ENGINES,
    MAX_IMAGE_SIZE,
    MAX_SEED,
    MIN_IMAGE_SIZE,
    POOLS,
    PRECISIONS,
    TTA_CHOICES,
    Augment,
    HeadSpec,
    backbone_entries,
    parse_operating_point,
    valid_image_size,
    valid_policy,
)
from transferkit.recipes import RECIPES

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle", "inverse_time")
MONITORS = ("val_loss", "val_acc", "val_balanced_acc")
HEAD_FITS = ("sgd", "exact")
CLASS_BALANCES = ("none", "weights", "sampler")
FLOAT32_MAX = 3.4028234663852886e38
# feature_views auto: augmented views only where they were measured to help, an exact head on average-pooled
# features (decisions 0260, 0298), and only for training sets this small, where two more extraction passes are cheap
AUTO_VIEWS_MAX_IMAGES = 300
AUTO_VIEWS = 3
# epochs_finetune auto (decision 0303): on a CPU, fine-tuning gained nothing on average over the frozen head below
# ~700 training images and a few tenths of a point above, at 40-300x the frozen stage's time; on a GPU it is cheap.
AUTO_FINETUNE_EPOCHS = 3
AUTO_FINETUNE_MIN_CPU_IMAGES = 700


def finite_float32(value: object) -> bool:
    """True for anything but a float that is infinite, NaN or beyond float32's range (3.4e38)."""
    return not isinstance(value, float) or (math.isfinite(value) and abs(value) <= FLOAT32_MAX)


@dataclass
class TrainConfig:
    backbone: str = DEFAULT_BACKBONE  # or several, comma-separated (NAME or NAME=FILE): train averages their runs
    weights: str | None = None  # a local weights file, for backbones without offline weights (one backbone)
    recipe: str = "default"
    # head
    head_hidden: list[int] = field(default_factory=list)
    head_dropout: float = 0.2
    head_batchnorm: bool = False
    binary_logit: bool = True  # two classes -> one logit + BCE; False -> 2-way softmax
    label_smoothing: float = 0.0
    # chosen on the validation images after training (transferkit.tuning)
    tta: str = "none"  # test-time augmentation: auto (lowest val loss) | none | flip | dihedral (8 views)
    operating_point: str = "default"  # two classes: default (larger p) | accuracy | balanced | recall=R | precision=P
    # data
    image_size: int | None = None  # None: the backbone's pretrained input size
    crop_pct: float | None = None  # None: the backbone's; 1.0 keeps the whole image (no centre crop)
    augment: str = "light"
    augment_options: dict[str, Any] = field(default_factory=dict)  # per-knob overrides of the preset
    # 1 clean + augmented views, features computed once; auto: 3 for an exact head on up to 300 images, else 1
    feature_views: int | str = "auto"  # views per training image in the frozen stage (auto: see the line above)
    # last | auto | levels like "2,3,4": features also pooled from intermediate levels (timm forward_intermediates
    # indices); auto chooses the set on validation
    feature_depths: str = "last"
    pool: str = "auto"  # how a CNN's feature maps are pooled: auto (max) | max | avg (decision 0298)
    feature_engine: str = "auto"  # auto | openvino | onnx | torch: what runs the frozen backbone for features
    cache: bool = True  # reuse frozen-backbone features across runs (keyed by weights, preprocessing, content)
    cache_dir: str | None = None  # None: $TRANSFERKIT_CACHE, else the user cache folder
    val_split: float = 0.2
    test_split: float = 0.0
    box_margin: float = 0.0  # CSV boxes: fraction of the box's width/height added on each side (clipped to the image)
    batch_size: int = 32
    shuffle_buffer: int = 1000  # packed shards (`transferkit pack`): images a streaming reader shuffles among
    workers: int = 2
    # stage 1: frozen backbone, head only
    epochs_frozen: int = 30
    # exact: a linear head solved (L-BFGS, C on validation; hidden layers and multi-label keep SGD, decision 0280);
    # sgd: epochs_frozen epochs of the optimizer
    head_fit: str = "exact"
    lr: float = 1e-3
    optimizer: str = "adamw"
    # stage 2: fine-tune
    epochs_finetune: int | str = "auto"  # auto: 3 on a GPU, and on a CPU from 700 training images; else none
    unfreeze: str = "3"  # "all" or the number of top blocks (timm coarse groups: stem, stages..., head conv)
    finetune_lr: float = 3e-4  # head learning rate in stage 2 (stage 1: lr)
    backbone_lr_mult: float = 0.3  # backbone lr = finetune_lr * this
    finetune_optimizer: str | None = None  # None: same as stage 1
    finetune_bn: bool = False  # re-estimate backbone batch-norm statistics while fine-tuning
    layer_decay: float = 1.0  # each backbone layer's lr is this times the one above's (e.g. 0.8); 1: off
    ema_decay: float = 0.0  # EMA of the weights while fine-tuning (e.g. 0.999), kept if better on val; 0: off
    ema_warmup: bool = True  # timm's EMA warmup: the decay grows with the steps towards ema_decay
    mixup: float = 0.0  # mixup alpha for fine-tuning batches (e.g. 0.2); 0: off
    cutmix: float = 0.0  # CutMix alpha for fine-tuning batches (e.g. 1.0); 0: off; with mixup, one per batch
    class_balance: str = "none"  # none | weights (inverse-frequency loss weights) | sampler (classes drawn evenly)
    # both stages
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lr_decay: float = 0.0  # Keras' `decay` (inverse-time, per step) for schedule=inverse_time
    device: str = "auto"  # auto: CUDA when available, else CPU
    precision: str = "auto"  # auto: fp16 AMP on CUDA, fp32 on CPU; or fp32 / bf16 / fp16
    accumulate: int = 1  # gradient accumulation: optimizer step every N batches
    monitor: str = "val_loss"  # val_loss | val_acc | val_balanced_acc: what early stopping and the kept weights follow
    patience: int = 5  # early stopping; 0 disables
    seed: int = 0
    checkpoint_every: int = 200  # optimizer steps between checkpoints (also one per epoch); 0: per epoch only
    # several processes (accelerate launch): batch_size is per process; the global batch is N times larger
    scale_lr: bool = False  # multiply the learning rates by the number of processes (the linear scaling rule)
    sync_bn: bool = False  # batch-norm statistics over the global batch while fine-tuning them (GPUs only)
    # evaluation
    drop_leaks: bool = False  # score held-out images without those byte-identical to a training image
    # soups and ensembles (decision 0275)
    soup: int = 0  # greedy soup of the best N fine-tuning epochs' weights, kept if validation does not drop; 0: off
    ensemble: bool = False  # auto: keep both finalists as an ensemble when averaging them beats the winner on val

    def members(self) -> list[tuple[str, str | None]]:
        """(backbone, weights file or None) of each network `backbone` names; one unless it lists several."""
        return [(self.backbone, self.weights)] if "," not in self.backbone else backbone_entries(self.backbone)

    def head_spec(self) -> HeadSpec:
        return HeadSpec(tuple(self.head_hidden), self.head_dropout, self.head_batchnorm)

    def depths(self) -> tuple[int, ...]:
        """The fixed intermediate levels of `feature_depths` (none for last, and for auto until stage 1 chooses)."""
        if self.feature_depths in ("last", "auto"):
            return ()
        return tuple(sorted({int(level) for level in self.feature_depths.split(",")}))

    def views_for(self, train_images: int) -> int:
        """How many feature views stage 1 extracts for a training set of this size: auto's choice (the clean view
        alone for an SGD head or features not pooled by average, which augmented views did not improve: decisions
        0260, 0298), else the configured number."""
        if self.feature_views != "auto":
            return int(self.feature_views)
        views_help = self.solves_head and self.pool == "avg"
        return AUTO_VIEWS if views_help and train_images <= AUTO_VIEWS_MAX_IMAGES else 1

    def for_device(self, device_type: str, train_images: int) -> TrainConfig:
        """This configuration with `epochs_finetune: auto` made a number for a device of this type ("cpu", "cuda")
        and a training split this large: AUTO_FINETUNE_EPOCHS on a GPU, on a CPU from AUTO_FINETUNE_MIN_CPU_IMAGES,
        or where there is no frozen stage; else none."""
        if self.epochs_finetune != "auto":
            return self
        pays = device_type == "cuda" or train_images >= AUTO_FINETUNE_MIN_CPU_IMAGES or self.epochs_frozen == 0
        return dataclasses.replace(self, epochs_finetune=AUTO_FINETUNE_EPOCHS if pays else 0)

    @property
    def solves_head(self) -> bool:
        """Whether stage 1 solves a single linear layer exactly (head_fit exact and no hidden layers) for
        single-label data."""
        return self.head_fit == "exact" and not self.head_hidden

    def augmentation(self) -> Augment:
        return dataclasses.replace(AUGMENT_PRESETS[self.augment], **self.augment_options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def backbone_checks(self) -> list[tuple[bool, str]]:
        names = [name for name, _ in self.members()]
        return [(all(names) and len(set(names)) == len(names),
                 "backbone must name one backbone, or several different ones separated by commas"),
                (len(names) == 1 or self.weights is None,
                 "weights is the file of one backbone; with several, give each its own as NAME=FILE in backbone")]

    def choice_checks(self) -> list[tuple[bool, str]]:
        """Options that name one of a fixed set of choices."""
        return [
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (
                self.finetune_optimizer in (None, *OPTIMIZERS),
                f"finetune_optimizer must be one of {', '.join(OPTIMIZERS)}",
            ),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (self.monitor in MONITORS, f"monitor must be one of {', '.join(MONITORS)}"),
            (self.augment in AUGMENT_PRESETS, f"augment must be one of {', '.join(AUGMENT_PRESETS)}"),
            (self.unfreeze == "all" or str(self.unfreeze).isdigit(), "unfreeze must be 'all' or a number of blocks"),
            (self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.head_fit in HEAD_FITS, f"head_fit must be one of {', '.join(HEAD_FITS)}"),
            (self.feature_depths in ("last", "auto") or all(p.isdigit() for p in self.feature_depths.split(",")),
             "feature_depths must be last, auto or levels like 2,3,4"),
            (self.pool in POOLS, f"pool must be one of {', '.join(POOLS)}"),
            (self.feature_engine in ENGINES, f"feature_engine must be one of {', '.join(ENGINES)}"),
            (self.class_balance in CLASS_BALANCES, f"class_balance must be one of {', '.join(CLASS_BALANCES)}"),
            (self.tta in TTA_CHOICES, f"tta must be one of {', '.join(TTA_CHOICES)}"),
        ]

    def number_checks(self) -> list[tuple[bool, str]]:
        """Options that are counts, rates or fractions within their range."""
        unbounded = [f.name for f in fields(self) if not finite_float32(getattr(self, f.name))]
        return [
            (not unbounded, f"{', '.join(unbounded)} must be a finite number (training computes in float32)"),
            (0 < self.val_split < 1, "val_split must be between 0 and 1"),
            (0 <= self.test_split < 1 and self.val_split + self.test_split < 1, "val_split + test_split must be < 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.shuffle_buffer >= 1, "shuffle_buffer must be at least 1"),
            (self.epochs_frozen >= 0, "epochs_frozen must be 0 or more"),
            (self.epochs_finetune == "auto" or (isinstance(self.epochs_finetune, int) and self.epochs_finetune >= 0),
             "epochs_finetune must be auto or 0 or more"),
            (not isinstance(self.epochs_finetune, int) or self.epochs_frozen + self.epochs_finetune > 0,
             "nothing to train: both epoch counts are 0"),
            (self.lr > 0 and self.finetune_lr > 0, "learning rates must be positive"),
            (0 <= self.head_dropout < 1, "head_dropout must be in [0, 1)"),
            (all(width >= 1 for width in self.head_hidden), "head_hidden widths must be at least 1"),
            (self.feature_views == "auto" or (isinstance(self.feature_views, int) and self.feature_views >= 1),
             "feature_views must be auto or at least 1"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.patience >= 0, "patience must be 0 (off) or more epochs"),
            (self.backbone_lr_mult >= 0 and self.weight_decay >= 0 and self.lr_decay >= 0,
             "backbone_lr_mult, weight_decay and lr_decay must be 0 or more"),
            (self.adam_eps > 0 and 0 <= self.momentum < 1, "adam_eps must be positive and momentum in [0, 1)"),
            (self.warmup_epochs >= 0, "warmup_epochs must be 0 or more"),
            (self.accumulate >= 1, "accumulate must be at least 1"),
            (self.workers >= 0, "workers must be 0 or more"),
            (0 <= self.seed <= MAX_SEED, f"seed must be between 0 and {MAX_SEED}"),
            (self.checkpoint_every >= 0, "checkpoint_every must be 0 (per epoch only) or more steps"),
            (valid_image_size(self.image_size),
             f"image_size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels"),
            (self.crop_pct is None or 0.2 <= self.crop_pct <= 1.0, "crop_pct must be between 0.2 and 1"),
            (0 <= self.box_margin <= 10, "box_margin must be between 0 and 10 (a fraction of the box's size)"),
            (0 < self.layer_decay <= 1, "layer_decay must be in (0, 1] (1: off)"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1) (0: off)"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be 0 (off) or positive alphas"),
            (self.soup == 0 or self.soup >= 2, "soup must be 0 (off) or the number of epochs to average, 2 or more"),
        ]

    def validate(self) -> TrainConfig:
        self.feature_depths = str(self.feature_depths).replace(" ", "")  # YAML reads `feature_depths: 3` as a number
        checks = [*self.backbone_checks(), *self.choice_checks(), *self.number_checks()]
        for ok, message in checks:
            if not ok:
                raise UserError(f"bad configuration: {message}")
        unknown = set(self.augment_options) - {f.name for f in fields(Augment)}
        if unknown:
            raise UserError(f"bad configuration: unknown augment_options {', '.join(sorted(unknown))}")
        if not valid_policy(self.augmentation().policy):
            raise UserError("bad configuration: augment policy must be none, trivial or a timm RandAugment string "
                            "like rand-m9-mstd0.5")
        try:
            parse_operating_point(self.operating_point)
        except UserError as exc:
            raise UserError(f"bad configuration: {exc}") from None
        self.unfreeze = str(self.unfreeze)
        return self


def field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(TrainConfig)}


def typed(key: str, value: Any, annotation: str) -> Any:
    """`value` as the field's type ("int", "float | None", "list[int]", "str", ...), or a UserError."""
    for option in (part.strip() for part in annotation.split("|")):
        if option == "None" and value is None:
            return None
        if option == "bool" and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue
        if option == "int" and isinstance(value, int):
            return value
        if option == "float" and isinstance(value, int | float):
            return float(value)
        if option == "str" and isinstance(value, str | int | float | os.PathLike):
            return str(value)  # `unfreeze: 3` reads as a number, and means "3"; a Path is a name
        if option.startswith("list") and isinstance(value, list) and all(isinstance(v, int) for v in value):
            return value
        if option.startswith("dict") and isinstance(value, dict):
            return value
    raise UserError(f"configuration key '{key}' expects {annotation}, not {value!r}")


def unknown_key(key: str, origin: str) -> UserError:
    close = difflib.get_close_matches(key, field_types(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else " (`transferkit config` lists them)"
    return UserError(f"unknown configuration key '{key}' in {origin}{hint}")


def checked(values: dict[str, Any], origin: str) -> dict[str, Any]:
    """Known keys only, each value of its field's type."""
    types = field_types()
    for key in values:
        if key not in types:
            raise unknown_key(key, origin)
    return {key: typed(key, value, types[key]) for key, value in values.items()}


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return checked(values, str(path))


def resolve_config(recipe: str | None = None, config_file: str | None = None, **overrides: Any) -> TrainConfig:
    """Layer the sources; None overrides mean "not given" so a flag never silently resets a recipe value."""
    file_values = read_config_file(config_file) if config_file else {}
    recipe = recipe or file_values.get("recipe") or "default"
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe '{recipe}': choose one of {', '.join(RECIPES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {**RECIPES[recipe], **file_values, **checked(given, "arguments"), "recipe": recipe}
    try:
        config = TrainConfig(**values)
    except TypeError as exc:
        raise UserError(f"bad configuration: {exc}") from None
    return config.validate()


def write_config(config: TrainConfig, path: Path) -> None:
    atomic_write(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
