"""Preprocessing (from the backbone's pretrained config) and augmentation (ImageDataGenerator-style knobs)."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2 as T

from transferkit.data.preprocess import Preprocess
from transferkit.options import Augment


class SamplewiseCenter(torch.nn.Module):
    """Keras' samplewise_center: each image minus its own mean, removing global brightness."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image - image.mean()


def symmetry(images: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square on (..., H, W) tensors: identity, mirror, upside down, both,
    then the same four of the transpose (square images only). Test-time augmentation's views come in this order."""
    x = images.transpose(-2, -1) if k >= 4 else images
    flips = [(), (-1,), (-2,), (-2, -1)][k % 4]
    return x.flip(flips) if flips else x


class Symmetry(torch.nn.Module):
    """One fixed symmetry of the square: a frozen-stage feature view of `augment: dihedral`."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return symmetry(image, self.k)


class RandomDihedral(torch.nn.Module):
    """A random one of the 8 symmetries, for images with no up or down (cells, micrographs, textures): quarter
    turns and mirrors change nothing a label depends on."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return symmetry(image, int(torch.randint(8, ())))


def decode_size(transform: object) -> int | None:
    """How small a JPEG may be decoded for `transform` (data.images.load_rgb's `reduce_to`): the short side its first
    resize makes; for a random resized crop, the short side whose smallest crop still covers the output (so no crop
    is ever enlarged); None for anything else."""
    first = transform
    while isinstance(first, T.Compose):
        first = first.transforms[0]
    if isinstance(first, T.Resize):
        return first.size if isinstance(first.size, int) else min(first.size)
    if isinstance(first, T.RandomResizedCrop):  # a crop of area s*A and aspect r has a short side >= sqrt(s*r')*S
        narrowest = min(first.ratio[0], 1 / first.ratio[1])
        return math.ceil(max(first.size) / math.sqrt(first.scale[0] * narrowest))
    return None


def _normalize(pre: Preprocess) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]


def eval_transform(pre: Preprocess, samplewise_center: bool = False) -> T.Compose:
    """Resize the short side to size/crop_pct, centre-crop: exactly what the pretrained model was evaluated with."""
    steps = [
        T.Resize(pre.resize_size, interpolation=T.InterpolationMode(pre.interpolation), antialias=True),
        T.CenterCrop(pre.image_size),
    ]
    steps += _normalize(pre)
    if samplewise_center:
        steps.append(SamplewiseCenter())
    return T.Compose(steps)


def rand_augment(policy: str, pre: Preprocess):
    """timm's RandAugment (on PIL images) as its own training transforms configure it: translations relative to the
    image size, filled with the mean colour."""
    from timm.data import rand_augment_transform

    fill = tuple(round(255 * m) for m in pre.mean)
    return rand_augment_transform(policy, {"translate_const": int(pre.image_size * 0.45), "img_mean": fill})


def train_transform(pre: Preprocess, aug: Augment) -> T.Compose:
    """The eval pipeline with random geometry first, so an un-augmented view equals the eval view."""
    if aug.is_identity:
        return eval_transform(pre, aug.samplewise_center)
    interp = T.InterpolationMode(pre.interpolation)
    if aug.policy != "none":
        steps: list = [T.RandomResizedCrop(pre.image_size, scale=(0.35, 1.0), interpolation=interp, antialias=True),
                       T.TrivialAugmentWide(interpolation=interp) if aug.policy == "trivial" else
                       rand_augment(aug.policy, pre)]
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
    if aug.dihedral:
        steps.append(RandomDihedral())
    if aug.samplewise_center:
        steps.append(SamplewiseCenter())
    return T.Compose(steps)
