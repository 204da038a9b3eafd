"""What the pretrained network expects of an image, without PyTorch: stored in meta.json and the export's metadata,
applied by torchvision in training and by Pillow + numpy where an export predicts alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np
from PIL import Image

PIL_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "box": Image.BOX,
                "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


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

    def rule(self) -> str:
        """eval_transform in words, exactly enough to re-implement with PIL and numpy (docs/preprocessing.md)."""
        return (f"R = int({self.image_size} / {self.crop_pct}) = {self.resize_size} px; decode to 8-bit RGB (a JPEG "
                f"at the reduced scale PIL's Image.draft(image.mode, (R, R)) picks before loading; EXIF orientation "
                f"applied, transparency composited on white); resize with PIL "
                f"Image.resize(resample={self.interpolation.upper()}) so the shorter side is R and the longer side "
                f"int(R * longer / shorter) px (no resize when the size is already that); centre-crop "
                f"{self.image_size}x{self.image_size} px at left = round((width - {self.image_size}) / 2), "
                f"top = round((height - {self.image_size}) / 2) (Python's round: halves to even); no padding; "
                f"float32 pixels / 255 in [0, 1], NCHW; the model subtracts mean and divides by std itself")

    def geometry(self, image: Image.Image) -> Image.Image:
        """The resize and centre crop of `rule()`, in Pillow alone: bit for bit torchvision's Resize + CenterCrop
        on a PIL image (tests/test_serve.py), so an export predicts without PyTorch."""
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        if size != image.size:
            image = image.resize(size, resample=PIL_RESAMPLE[self.interpolation])
        width, height = image.size
        left, top = int(round((width - self.image_size) / 2.0)), int(round((height - self.image_size) / 2.0))
        return image.crop((left, top, left + self.image_size, top + self.image_size))

    def pixels(self, images: list[Image.Image]) -> np.ndarray:
        """Decoded RGB images as the network's float32 NCHW pixels in [0, 1] (uint8 * float32(1/255), as
        torchvision's ToDtype scales them)."""
        hwc = np.stack([np.asarray(self.geometry(image)) for image in images])
        pixels = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2), dtype=np.float32)
        pixels *= np.float32(1 / 255)
        return pixels
