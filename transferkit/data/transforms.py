"""Preprocessing (from the backbone's pretrained config) and augmentation (ImageDataGenerator-style knobs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
from torchvision.transforms import v2 as T

from transferkit.options import Augment


@dataclass(frozen=True)
class Preprocess:
    """What the pretrained network expects; stored in meta.json so predict never retypes it."""

    image_size: int
    interpolation: str
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_timm_config(cls, cfg: dict) -> Preprocess:
        return cls(
            image_size=int(cfg["input_size"][-1]),
            interpolation=str(cfg.get("interpolation", "bilinear")),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
        )

    @classmethod
    def for_model(cls, model, image_size: int | None = None, crop_pct: float | None = None) -> Preprocess:
        """A timm model's own preprocessing, with the image size and crop overridden where given."""
        pre = cls.from_timm_config(model.pretrained_cfg)
        return replace(pre, image_size=image_size or pre.image_size, crop_pct=crop_pct or pre.crop_pct)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        values = {f.name: data[f.name] for f in fields(cls)}
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def resize_size(self) -> int:
        return int(self.image_size / self.crop_pct)

    @property
    def interpolation_mode(self) -> T.InterpolationMode:
        return T.InterpolationMode(self.interpolation)

    def rule(self) -> str:
        """eval_transform in words, exactly enough to re-implement with PIL and numpy (docs/preprocessing.md)."""
        return (f"decode to 8-bit RGB (EXIF orientation applied, transparency composited on white); resize with PIL "
                f"Image.resize(resample={self.interpolation.upper()}) so the shorter side is "
                f"R = int({self.image_size} / {self.crop_pct}) = {self.resize_size} px and the longer side "
                f"int(R * longer / shorter) px (no resize when the size is already that); centre-crop "
                f"{self.image_size}x{self.image_size} px at left = round((width - {self.image_size}) / 2), "
                f"top = round((height - {self.image_size}) / 2) (Python's round: halves to even); no padding; "
                f"float32 pixels / 255 in [0, 1], NCHW; the model subtracts mean and divides by std itself")


class SamplewiseCenter(torch.nn.Module):
    """Keras' samplewise_center: each image minus its own mean, removing global brightness."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image - image.mean()


def _normalize(pre: Preprocess) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]


def eval_transform(pre: Preprocess, samplewise_center: bool = False) -> T.Compose:
    """Resize the short side to size/crop_pct, centre-crop: exactly what the pretrained model was evaluated with."""
    steps = [
        T.Resize(pre.resize_size, interpolation=pre.interpolation_mode, antialias=True),
        T.CenterCrop(pre.image_size),
    ]
    steps += _normalize(pre)
    if samplewise_center:
        steps.append(SamplewiseCenter())
    return T.Compose(steps)


def train_transform(pre: Preprocess, aug: Augment) -> T.Compose:
    """The eval pipeline with random geometry first, so an un-augmented view equals the eval view."""
    if aug.is_identity:
        return eval_transform(pre, aug.samplewise_center)
    interp = pre.interpolation_mode
    if aug.policy == "trivial":
        steps: list = [
            T.RandomResizedCrop(pre.image_size, scale=(0.35, 1.0), interpolation=interp, antialias=True),
            T.TrivialAugmentWide(interpolation=interp),
        ]
    else:
        steps = [T.Resize(pre.resize_size, interpolation=interp, antialias=True), T.CenterCrop(pre.image_size)]
        if aug.rotation or aug.zoom or aug.width_shift or aug.height_shift or aug.shear:
            steps.append(
                T.RandomAffine(
                    degrees=aug.rotation,
                    translate=(aug.width_shift, aug.height_shift) if (aug.width_shift or aug.height_shift) else None,
                    scale=(1 - aug.zoom, 1 + aug.zoom) if aug.zoom else None,
                    shear=aug.shear or None,
                    interpolation=interp,
                    fill=(127, 127, 127),
                )
            )
    if aug.horizontal_flip:
        steps.append(T.RandomHorizontalFlip())
    if aug.vertical_flip:
        steps.append(T.RandomVerticalFlip())
    steps += _normalize(pre)
    if aug.samplewise_center:
        steps.append(SamplewiseCenter())
    return T.Compose(steps)
