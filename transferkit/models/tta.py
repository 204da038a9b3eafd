"""Test-time augmentation: the logits of a few flipped or rotated views of each image, averaged.

"flip" adds the mirror image; "dihedral" all 8 symmetries of the square (4 rotations, each mirrored), for data
with no up or down (cells, micrographs, textures). The views are one batch through the model, so an exported
graph holds them too. Logits (not probabilities) are averaged, so temperature scaling and the threshold apply to
the averaged model exactly as to a plain one.
"""

from __future__ import annotations

import torch
from torch import nn

from transferkit.data.transforms import symmetry
from transferkit.options import TTA_CHOICES, TTA_MODES, TTA_VIEWS

MODES, CHOICES = TTA_MODES, TTA_CHOICES
VIEWS = TTA_VIEWS
INFERENCE_BATCH = 32  # views per forward pass when inferring: all views of an image go through together


def images_per_batch(count: int) -> int:
    """Images per inference batch with `count` views each, so that memory does not grow with the views."""
    return max(1, INFERENCE_BATCH // count)


def views(images: torch.Tensor, count: int) -> torch.Tensor:
    """(count * N, C, H, W): the first `count` symmetries of the square of each image (data.transforms.symmetry's
    order: x, mirror, upside down, both, then the same of x transposed), view-major. The first 2 are "flip"; all 8
    are the dihedral group (transposes need square images)."""
    return torch.cat([symmetry(images, k) for k in range(count)])


def view_logits(model: nn.Module, images: torch.Tensor, count: int) -> torch.Tensor:
    """(N, count, classes): the model's logits for each view of each image."""
    if count == 1:
        return model(images).unsqueeze(1)
    logits = model(views(images, count).contiguous(memory_format=torch.channels_last))
    return logits.reshape(count, images.shape[0], -1).transpose(0, 1)


def tta_logits(model: nn.Module, images: torch.Tensor, mode: str) -> torch.Tensor:
    """(N, classes): the logits averaged over the mode's views ("none": the model's own)."""
    return view_logits(model, images, VIEWS[mode]).mean(dim=1)


class ViewLogits(nn.Module):
    """A model whose output is every view's logits, (N, count, classes): one pass over validation images gives
    each mode's averaged logits (a mode's views are the first ones of the next)."""

    def __init__(self, model: nn.Module, count: int) -> None:
        super().__init__()
        self.model, self.count = model, count

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return view_logits(self.model, images, self.count)


class Averaged(nn.Module):
    """A model with test-time augmentation: logits averaged over the mode's views."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.model, images, self.mode)


def per_mode(view_logits_: torch.Tensor, modes: tuple[str, ...] = MODES) -> dict[str, torch.Tensor]:
    """{mode: (N, classes) averaged logits} from (N, views, classes) logits that hold at least each mode's views."""
    return {mode: view_logits_[:, : VIEWS[mode]].mean(dim=1) for mode in modes if VIEWS[mode] <= view_logits_.shape[1]}
