"""The choices a configuration names, without PyTorch: `config.py`, the CLI's help and its validation import this,
and the modules that act on a choice import it from here too, so `transferkit --help` loads no torch."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from transferkit.errors import UserError

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
ENGINES = ("auto", "openvino", "onnx", "torch")  # what runs the frozen backbone for features
POOLS = ("auto", "max", "avg")  # how a CNN's feature maps are pooled (auto: max, decision 0298)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TTA_VIEWS = {"none": 1, "flip": 2, "dihedral": 8}  # test-time views of each mode (symmetries of the square)
TTA_MODES = tuple(TTA_VIEWS)
TTA_CHOICES = ("auto", *TTA_MODES)
OPERATING_POINTS = ("default", "accuracy", "balanced", "recall=R", "precision=P")
MAX_SEED = 2**32 - 1  # NumPy's seeds are unsigned 32-bit
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 2048  # pixels a side: 32 inputs of 2048² already take 1.6 GB before the network runs
EXPORT_FORMATS = ("onnx", "torchscript")
EXPORT_SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth")}  # what --out may end in


def valid_image_size(size: int | None) -> bool:
    """An input size a run can use: None (the backbone's own) or MIN_IMAGE_SIZE..MAX_IMAGE_SIZE pixels a side."""
    return size is None or MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE


def check_export_choice(fmt: str, int8: bool) -> None:
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format '{fmt}': choose one of {', '.join(EXPORT_FORMATS)}")
    if int8 and fmt != "onnx":
        raise UserError("--int8 needs --format onnx")


EVALUATED_SPLITS = ("train", "val", "test", "all")  # `evaluate --split`: a split of the data, or every image


def check_evaluated_split(split: str | None) -> None:
    if split not in (None, *EVALUATED_SPLITS):
        raise UserError(f"unknown split '{split}': choose one of train, val, test or all")


def check_time_budget(minutes: float) -> None:
    if not (minutes > 0 and math.isfinite(minutes)):
        raise UserError(f"--time-budget must be a number of minutes more than 0, not {minutes:g}")


@dataclass(frozen=True)
class HeadSpec:
    """Global average pooling -> dropout -> (dense N, relu, [batch-norm]) x len(hidden) -> output logits."""

    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    batchnorm: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden": list(self.hidden)}


@dataclass(frozen=True)
class Augment:
    """The Keras ImageDataGenerator knobs the tutorials use, plus the `strong` policy switch."""

    rotation: float = 0.0  # degrees, sampled in [-rotation, rotation]
    zoom: float = 0.0  # scale sampled in [1 - zoom, 1 + zoom]
    width_shift: float = 0.0  # fraction of width
    height_shift: float = 0.0  # fraction of height
    shear: float = 0.0  # degrees
    horizontal_flip: bool = False
    vertical_flip: bool = False
    dihedral: bool = False  # random quarter turns and mirrors (no up or down); stage 1 sees all 8 exactly
    samplewise_center: bool = False  # subtract each image's own mean after normalisation
    # "none" | "trivial" (TrivialAugmentWide) | a timm RandAugment string such as "rand-m9-mstd0.5"; both policies
    # follow a random resized crop
    policy: str = "none"

    @property
    def is_identity(self) -> bool:
        return self == Augment(samplewise_center=self.samplewise_center)

    @property
    def exact_symmetries(self) -> int:
        """How many symmetries of the square the frozen stage trains on exactly, as test-time augmentation's views:
        8 for dihedral, 2 (the image and its mirror) for a mirror alone, else 0 (random augmented views)."""
        if self.dihedral:
            return TTA_VIEWS["dihedral"]
        mirror_only = self == Augment(horizontal_flip=True, samplewise_center=self.samplewise_center)
        return TTA_VIEWS["flip"] if mirror_only else 0


AUGMENT_PRESETS: dict[str, Augment] = {
    "none": Augment(),
    "light": Augment(rotation=10, zoom=0.1, width_shift=0.1, height_shift=0.1, horizontal_flip=True),
    "strong": Augment(horizontal_flip=True, policy="trivial"),
    "dihedral": Augment(dihedral=True),
    "flip": Augment(horizontal_flip=True),  # stage 1 on the image and its mirror; pair with tta flip (decision 0294)
    "randaugment": Augment(horizontal_flip=True, policy="rand-m9-mstd0.5"),  # timm's RandAugment, as in its recipes
}
# timm's RandAugment configuration: "rand", then sections for magnitude, layers, its std and max, probability
RANDAUGMENT = re.compile(r"^rand(-(m\d+|n\d+|mmax\d+|inc[01]|p[0-9.]+|mstd[0-9.]+))*$")


def valid_policy(policy: str) -> bool:
    return policy in ("none", "trivial") or bool(RANDAUGMENT.match(policy))


def parse_operating_point(value: str) -> tuple[str, float | None]:
    """'accuracy' -> ('accuracy', None); 'recall=0.9' -> ('recall', 0.9). Anything else is a UserError."""
    name, _, target = str(value).partition("=")
    if name in ("default", "accuracy", "balanced") and not target:
        return name, None
    if name in ("recall", "precision") and target:
        try:
            number = float(target)
        except ValueError:
            number = -1.0
        if 0 < number <= 1:
            return name, number
    raise UserError(f"operating point must be one of {', '.join(OPERATING_POINTS)} (R, P in (0, 1]), not '{value}'")


def as_loss(value: float, monitor: str) -> float:
    """A monitored value (`monitor`: val_loss or an accuracy) made lower-is-better (accuracies negated), so every
    comparison is one `<`."""
    return value if monitor == "val_loss" else -value


def backbone_entries(text: str) -> list[tuple[str, str | None]]:
    """`a,b=FILE,c` -> (name, weights file or None) per comma-separated entry, stripped; an empty entry is ("", None)
    (train refuses it, auto's --backbones skips it)."""
    entries = (entry.partition("=") for entry in text.split(","))
    return [(name.strip(), path.strip() or None) for name, _, path in entries]
