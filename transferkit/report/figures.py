"""The report's pictures as data URIs, so the page is one file: matplotlib figures (evaluate's own plots where
they exist) as PNG, photos and Grad-CAM overlays as small JPEGs."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from transferkit.runs.evaluate import plot_confusion, plot_curves  # noqa: E402

THUMBNAIL_PX = 128


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def figure_uri(draw: Callable[[BinaryIO], None]) -> str:
    """A PNG data URI of whatever `draw` saves into the file object it is given."""
    buffer = io.BytesIO()
    draw(buffer)
    return data_uri("image/png", buffer.getvalue())


LETTERBOX = (238, 240, 243)  # the page's card background: the bars read as margin, not as part of the photo


def image_uri(image: Image.Image, max_px: int = THUMBNAIL_PX) -> str:
    """A JPEG data URI (photos: a fraction of a PNG's size) of the image letterboxed into a max_px square, so
    cards of wide, tall and square images are the same size."""
    buffer = io.BytesIO()
    letterbox(image, max_px).save(buffer, format="JPEG", quality=85)
    return data_uri("image/jpeg", buffer.getvalue())


def letterbox(image: Image.Image, px: int) -> Image.Image:
    """The whole image fitted into a px x px square, centred on LETTERBOX bars. A smaller image is enlarged with
    nearest-neighbour, so its pixels show as the blocks they are (see `upscale_note`)."""
    image = image.convert("RGB")
    scale = min(px / image.width, px / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    fitted = image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (px, px), LETTERBOX)
    canvas.paste(fitted, ((px - size[0]) // 2, (px - size[1]) // 2))
    return canvas


def upscale_note(size: tuple[int, int], shown_px: int) -> str:
    """A caption for an image shown (or seen by the network) larger than it is; empty when it is not."""
    width, height = size
    return f"enlarged: the image is only {width}x{height} px" if max(width, height) < shown_px else ""


def saved_or_drawn(saved: Path | None, draw: Callable[[BinaryIO], None]) -> str:
    """The PNG evaluation saved of the same drawing (`Run.write_metrics`, with metrics.json), else drawn now: each
    figure costs 0.1-0.3 s of a small run's report."""
    if saved is not None and saved.is_file():
        return data_uri("image/png", saved.read_bytes())
    return figure_uri(draw)


def stage_curves(history: list[dict], kept: dict | None = None, saved: Path | None = None) -> list[tuple[str, str]]:
    """(stage, loss-and-accuracy figure) for each stage in training order, the kept epoch marked in its stage.
    `saved`: curves.png of the whole history, which is the one stage's figure when there is one stage."""
    stages = list(dict.fromkeys(row["stage"] for row in history))
    saved = saved if len(stages) == 1 else None
    return [(stage, saved_or_drawn(saved, lambda out, s=stage: plot_curves([r for r in history if r["stage"] == s],
                                                                           out, kept)))
            for stage in stages]


def confusion_uri(matrix: list[list[int]], classes: list[str], saved: Path | None = None) -> str:
    return saved_or_drawn(saved, lambda out: plot_confusion(matrix, classes, out))


def roc_uri(is_positive: np.ndarray, positive_probability: np.ndarray, decided: np.ndarray | None = None) -> str:
    """The ROC curve of a binary task, the chance diagonal beside it, and the point of the run's `decided`
    positives (its operating point)."""
    fpr, tpr, _ = roc_curve(is_positive, positive_probability)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label="model")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    if decided is not None:
        ax.plot(decided[~is_positive].mean(), decided[is_positive].mean(), "o", color="crimson",
                label="operating point")
    return _finish(fig, ax, ("false positive rate", "true positive rate"), "lower right")


def precision_recall_uri(is_positive: np.ndarray, positive_probability: np.ndarray, decided: np.ndarray) -> str:
    """The precision-recall curve of a binary task, the positive rate (a guess's precision) and the operating
    point of the run's `decided` positives."""
    precision, recall, _ = precision_recall_curve(is_positive, positive_probability)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(recall, precision, label="model")
    ax.axhline(is_positive.mean(), linestyle="--", color="grey", label="chance")
    hits = decided & is_positive
    ax.plot(hits.sum() / is_positive.sum(), hits.sum() / max(decided.sum(), 1), "o", color="crimson",
            label="operating point")
    return _finish(fig, ax, ("recall", "precision"), "lower left")


def reliability_uri(curves: list[tuple[str, np.ndarray, np.ndarray]]) -> str:
    """Reliability diagram: accuracy against confidence per bin for each (label, mean confidence, accuracy)
    curve; a calibrated model lies on the diagonal."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    for label, confidence, accuracy in curves:
        ax.plot(confidence, accuracy, marker="o", label=label)
    return _finish(fig, ax, ("confidence (top probability)", "accuracy"), "upper left")


def _finish(fig: plt.Figure, ax: plt.Axes, labels: tuple[str, str], legend: str) -> str:
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend)
    fig.tight_layout()
    uri = figure_uri(lambda out: fig.savefig(out, format="png", dpi=100))
    plt.close(fig)
    return uri
