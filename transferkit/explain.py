"""Grad-CAM (Selvaraju et al., 2017): which region of an image made the classifier choose a class.

The last convolutional feature map still knows *where* things are; the head only sees its global average.
Weighting each channel of that map by how much the chosen class's score grows with it (the spatial mean of its
gradient) and keeping the positive evidence (ReLU) gives a coarse map of where the decision came from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from transferkit.data.transforms import Preprocess, eval_transform
from transferkit.models.classifier import Classifier

if TYPE_CHECKING:
    from transferkit.run import Run


def gradcam(model: Classifier, inputs: torch.Tensor, targets: Sequence[int], binary: bool) -> torch.Tensor:
    """(B, H, W) heatmaps in [0, 1] at the inputs' resolution, one per image, for the class index given for each."""
    model.eval()
    activation, logits = _activation_and_logits(model, inputs)
    scores = class_scores(logits, torch.as_tensor(list(targets)), binary)
    # In eval mode the images of a batch never interact, so the gradient of the summed scores is, per image,
    # the gradient of its own score: one backward pass for the whole batch.
    (grads,) = torch.autograd.grad(scores.sum(), activation)
    act, grads = as_grid(model.backbone, activation.detach()), as_grid(model.backbone, grads)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # a channel's importance: its spatially pooled gradient
    cam = torch.relu((weights * act).sum(dim=1, keepdim=True))  # only evidence *for* the class
    cam = F.interpolate(cam.float(), size=tuple(inputs.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
    return cam / peak[:, None, None]


def class_scores(logits: torch.Tensor, targets: torch.Tensor, binary: bool) -> torch.Tensor:
    """The score that rises with each image's target class. One binary logit means class 1; class 0 is its negative."""
    if binary:
        return torch.where(targets == 1, logits[:, 0], -logits[:, 0])
    return logits.gather(1, targets[:, None].long())[:, 0]


def _activation_and_logits(model: Classifier, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature map Grad-CAM weights, and logits computed from it with autograd on."""
    backbone = model.backbone
    layer = token_layer(backbone)
    if layer is None:
        # The map is forward_features' output: the backbone below it runs without autograd, so the backward
        # pass is only pooling + head (cheap enough for a server to do per request).
        with torch.no_grad():
            features = backbone.forward_features(inputs)
        features = features.detach().requires_grad_(True)
        with torch.enable_grad():
            return features, model.head(backbone.forward_head(features, pre_logits=True))
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        with torch.enable_grad():
            # Inputs that need a gradient put the hooked layer on the graph even when the weights are frozen.
            logits = model(inputs.detach().requires_grad_(True))
    finally:
        handle.remove()
    return captured[-1], logits


def token_layer(backbone: nn.Module) -> nn.Module | None:
    """For ViT-style backbones, the first norm of the last block; None for CNNs (use the last feature map).

    With class-token pooling the final patch tokens never reach the head, so their gradient is zero. Before the
    last block's attention they still feed the class token: the layer pytorch-grad-cam recommends for ViTs.
    """
    blocks = getattr(backbone, "blocks", None)
    if getattr(backbone, "num_prefix_tokens", None) is None or not isinstance(blocks, nn.Sequential) or not blocks:
        return None
    return getattr(blocks[-1], "norm1", None)


def as_grid(backbone: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """Any backbone's feature map as (B, C, h, w): CNN maps as they are (NHWC ones permuted), ViT tokens
    without their prefix (class/register) tokens, laid back onto the patch grid."""
    if tensor.ndim == 4:
        channels = int(getattr(backbone, "num_features", tensor.shape[1]))
        nhwc = tensor.shape[1] != channels and tensor.shape[-1] == channels  # e.g. timm's Swin
        return tensor.permute(0, 3, 1, 2) if nhwc else tensor
    tokens = tensor[:, int(getattr(backbone, "num_prefix_tokens", 0) or 0) :]
    batch, count, channels = tokens.shape
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    height, width = grid if grid and grid[0] * grid[1] == count else (math.isqrt(count), count // math.isqrt(count))
    return tokens.transpose(1, 2).reshape(batch, channels, height, width)


def model_view(image: Image.Image, pre: Preprocess) -> Image.Image:
    """The image exactly as the network saw it (resized, centre-cropped), for the heatmap to sit on."""
    tensor = eval_transform(pre)(image)
    mean, std = torch.tensor(pre.mean)[:, None, None], torch.tensor(pre.std)[:, None, None]
    pixels = ((tensor * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def overlay(view: Image.Image, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend a jet-coloured heatmap over the image (red: strongest evidence for the class)."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    base = np.asarray(view.convert("RGB"), dtype=np.float32) / 255
    mixed = (1 - alpha) * base + alpha * heat
    return Image.fromarray((mixed * 255).round().astype(np.uint8))


def explain_images(run: Run, images: list[Image.Image], targets: Sequence[int]) -> list[Image.Image]:
    """Grad-CAM overlays for decoded RGB images and their target class indices, on the run's own model."""
    inputs = torch.stack([run.transform(image) for image in images])
    cams = gradcam(run.model, inputs, targets, run.binary).numpy()
    return [overlay(model_view(image, run.preprocess), cam) for image, cam in zip(images, cams, strict=True)]
