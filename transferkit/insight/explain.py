"""Grad-CAM (Selvaraju et al., 2017): which region of an image made the classifier choose a class.

The last convolutional feature map still knows *where* things are; the head only sees its global average.
Weighting each channel of that map by how much the chosen class's score grows with it (the spatial mean of its
gradient) and keeping the positive evidence (ReLU) gives a coarse map of where the decision came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from transferkit.data.images import load_rgb
from transferkit.data.transforms import Preprocess, eval_transform
from transferkit.errors import UserError
from transferkit.models.classifier import Classifier
from transferkit.models.registry import feature_grid, gradcam_layer
from transferkit.task.calibration import decide
from transferkit.task.kinds import Task

if TYPE_CHECKING:
    from transferkit.runs.run import Run

BATCH_SIZE = 8  # images per backward pass: bounds the activations kept for autograd


def gradcam(model: Classifier, inputs: torch.Tensor, targets: Sequence[int], task: Task) -> torch.Tensor:
    """(B, H, W) heatmaps in [0, 1] at the inputs' resolution, one per image, for the class index given for each
    (on the CPU, wherever the model runs)."""
    model.eval()
    activation, logits = _activation_and_logits(model, inputs.to(next(model.parameters()).device))
    scores = task.scores(logits, torch.as_tensor(list(targets), device=logits.device))
    # In eval mode the images of a batch never interact, so the gradient of the summed scores is, per image,
    # the gradient of its own score: one backward pass for the whole batch.
    (grads,) = torch.autograd.grad(scores.sum(), activation)
    act, grads = feature_grid(model.backbone, activation.detach()), feature_grid(model.backbone, grads)
    # Grad-CAM: a channel's importance is its spatially averaged gradient. Under max pooling only each channel's peak
    # cell has a gradient, so every cell is weighed by its own: gradient x activation, what the cell adds to the score.
    weights = grads if model.global_pool == "max" else grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(dim=1, keepdim=True))  # only evidence *for* the class
    cam = F.interpolate(cam.float(), size=tuple(inputs.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
    return (cam / peak[:, None, None]).cpu()


def _activation_and_logits(model: Classifier, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature map Grad-CAM weights, and logits computed from it with autograd on."""
    backbone = model.backbone
    layer = gradcam_layer(backbone)
    if layer is None:
        # The map is forward_features' output: the backbone below it runs without autograd, so the backward
        # pass is only pooling + head (cheap enough for a server to do per request).
        # Multi-depth features' intermediate levels enter the head as constants: the map explains the last layer's part.
        with torch.no_grad():
            features, intermediates = model.maps(inputs)
        features = features.detach().requires_grad_(True)
        with torch.enable_grad():
            return features, model.head(model.pool(features, intermediates))
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        with torch.enable_grad():
            # Inputs that need a gradient put the hooked layer on the graph even when the weights are frozen.
            logits = model(inputs.detach().requires_grad_(True))
    finally:
        handle.remove()
    return captured[-1], logits


def model_view(image: Image.Image, pre: Preprocess) -> Image.Image:
    """The image exactly as the network saw it (resized, centre-cropped), for the heatmap to sit on."""
    tensor = eval_transform(pre)(image)
    mean, std = torch.tensor(pre.mean)[:, None, None], torch.tensor(pre.std)[:, None, None]
    pixels = ((tensor * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


HEAT_MAP = "inferno"  # perceptually ordered (dark to bright yellow); jet's uniform blue wash hid the photo's colours


def overlay(view: Image.Image, cam: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """Blend an inferno heatmap over the image, as opaque as the evidence is strong (bright yellow: the strongest),
    so where the class finds no evidence the photo shows with its own colours."""
    from matplotlib import colormaps

    strength = np.clip(cam, 0, 1)[..., None]
    heat = colormaps[HEAT_MAP](strength[..., 0])[..., :3]
    base = np.asarray(view.convert("RGB"), dtype=np.float32) / 255
    mixed = (1 - alpha * strength) * base + alpha * strength * heat
    return Image.fromarray((mixed * 255).round().astype(np.uint8))


def explain_images(run: Run, images: list[Image.Image], targets: Sequence[int]) -> list[Image.Image]:
    """Grad-CAM overlays for decoded RGB images and their target class indices, on the run's own model."""
    run = run.explained  # an ensemble's member of largest weight
    inputs = torch.stack([run.transform(image) for image in images])
    cams = gradcam(run.model, inputs, targets, run.task).numpy()
    return [overlay(model_view(image, run.preprocess), cam) for image, cam in zip(images, cams, strict=True)]


def class_index(run: Run, name: str) -> int:
    """The index of a class the run knows; any other name is the user's typo, answered with the valid names."""
    if name not in run.classes:
        raise UserError(f"unknown class '{name}': this model knows {', '.join(run.classes)}")
    return run.classes.index(name)


def explain_files(run: Run, paths: list[str], out_dir: Path, target: int | None = None) -> list[dict]:
    """Grad-CAM overlay PNGs in `out_dir` for readable image files, explaining class index `target` or else each
    image's predicted class. Per image: its path, the overlay written, the predicted label and probability, and
    the class explained."""
    out_dir.mkdir(parents=True, exist_ok=True)
    probs = run.probabilities(paths)
    predicted = decide(probs, run.threshold)
    targets = [int(p) if target is None else target for p in predicted]
    written = [out_dir / name for name in overlay_names(paths)]
    for start in range(0, len(paths), BATCH_SIZE):
        batch = slice(start, start + BATCH_SIZE)
        images = [load_rgb(path, reduce_to=run.explained.preprocess.resize_size) for path in paths[batch]]
        for image, destination in zip(explain_images(run, images, targets[batch]), written[batch], strict=True):
            image.save(destination)
    return [
        {"path": path, "overlay": str(overlay_path), "label": run.classes[p], "probability": float(row[p]),
         "explained": run.classes[t]}
        for path, overlay_path, row, p, t in zip(paths, written, probs, predicted, targets, strict=True)
    ]


def overlay_names(paths: list[str]) -> list[str]:
    """`<stem>_gradcam.png` per image; a stem seen before gets a number, so no overlay overwrites another."""
    names: list[str] = []
    taken: set[str] = set()
    for path in paths:
        stem = Path(path).stem
        name, n = f"{stem}_gradcam.png", 1
        while name in taken:
            n += 1
            name = f"{stem}_{n}_gradcam.png"
        names.append(name)
        taken.add(name)
    return names
