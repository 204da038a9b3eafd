"""The report's sections that show images: a Grad-CAM gallery, the top losses and a similarity heatmap of class
representatives. All are chosen from predictions.csv, so only these few images go through the model again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from transferkit.data.boxes import Box
from transferkit.data.content import file_digest
from transferkit.data.images import load_image
from transferkit.errors import UnreadableImage
from transferkit.insight.explain import explain_images
from transferkit.insight.similarity import cosine_matrix, embed_images, plot_similarity
from transferkit.report.figures import THUMBNAIL_PX, figure_uri, image_uri, upscale_note
from transferkit.task.calibration import decide

if TYPE_CHECKING:
    from transferkit.runs.run import Run

GALLERY_EACH = 6  # correct and wrong images with Grad-CAM: the report's only backward passes, so few
TOP_LOSSES = 12
SIMILARITY_MAX = 24  # images in the heatmap: more cells than this cannot be read
OVERLAY_PX = 192
SIMILARITY_PX = 96


@dataclass(frozen=True)
class Predictions:
    """predictions.csv: the evaluated images, their true class indices and (N, classes) probabilities."""

    paths: list[str]
    y_true: np.ndarray
    probs: np.ndarray
    crops: list[Box | None] | None = None  # the region of each image that was evaluated (boxed data)
    threshold: float | None = None  # a binary run's decision threshold (None: the larger probability)

    @property
    def y_pred(self) -> np.ndarray:
        return decide(self.probs, self.threshold)

    @property
    def p_true(self) -> np.ndarray:
        return self.probs[np.arange(len(self.y_true)), self.y_true]

    def correct_most_confident(self) -> np.ndarray:
        correct = np.flatnonzero(self.y_pred == self.y_true)
        return correct[np.argsort(-self.p_true[correct], kind="stable")]

    def wrong_largest_loss(self) -> np.ndarray:
        """Mistakes, the most confidently wrong (lowest probability of the true class: largest loss) first."""
        wrong = np.flatnonzero(self.y_pred != self.y_true)
        return wrong[np.argsort(self.p_true[wrong], kind="stable")]

    def best_of_each_class(self, per_class: int, max_classes: int) -> np.ndarray:
        """Per class (up to max_classes), its distinct images with the highest probability of their true class."""
        order = np.argsort(-self.p_true, kind="stable")
        classes = np.unique(self.y_true)[:max_classes]
        return np.concatenate([self.distinct(order[self.y_true[order] == c], per_class) for c in classes])

    def distinct(self, indices: np.ndarray, count: int | None = None) -> np.ndarray:
        """The first `count` of `indices` (all: None) whose region of their file is not a byte-identical copy of
        one before: a picture shown twice side by side says nothing more and hides another."""
        seen, chosen = set(), []
        for i in indices.tolist():
            if count is not None and len(chosen) == count:
                break
            crop = self.crops[i].to_list() if self.crops and self.crops[i] else None
            key = (content_key(self.paths[i]), str(crop))
            if key not in seen:
                seen.add(key)
                chosen.append(i)
        return np.array(chosen, dtype=int)


def content_key(path: str) -> str:
    """The file's content digest; its path when it cannot be read (it is then left out when loaded, not here)."""
    try:
        return file_digest(path)
    except OSError:
        return path


def load_chosen(pred: Predictions, chosen: list[int], reduce_to: int) -> tuple[list[tuple[int, Image.Image]], int]:
    """(index, decoded image, a large JPEG no smaller than `reduce_to` on either side) for each chosen image still
    readable, and how many are not (moved or deleted since evaluation: the report says so instead of failing)."""
    kept = []
    for i in chosen:
        try:
            kept.append((i, load_image(pred.paths[i], pred.crops[i] if pred.crops else None, reduce_to)))
        except UnreadableImage:
            continue
    return kept, len(chosen) - len(kept)


def spread_over_classes(indices: np.ndarray, labels: np.ndarray, count: int) -> list[int]:
    """Up to `count` of `indices`, taken in turn from each class, keeping each class's order."""
    queues = {c: [i for i in indices if labels[i] == c] for c in dict.fromkeys(labels[indices].tolist())}
    chosen: list[int] = []
    while len(chosen) < count and any(queues.values()):
        for queue in queues.values():
            if queue and len(chosen) < count:
                chosen.append(int(queue.pop(0)))
    return chosen


def card(pred: Predictions, i: int, classes: list[str], uri: str, note: str = "") -> dict:
    predicted = int(pred.y_pred[i])
    return {"uri": uri, "name": Path(pred.paths[i]).name, "path": pred.paths[i], "true": classes[pred.y_true[i]],
            "predicted": classes[predicted], "probability": float(pred.probs[i, predicted]),
            "p_true": float(pred.p_true[i]), "note": note}


def gallery_section(run: Run, pred: Predictions) -> dict:
    """The most confident correct images (spread over classes) and mistakes, with the Grad-CAM overlay of the
    predicted class: one batch through the model."""
    correct = spread_over_classes(pred.distinct(pred.correct_most_confident()), pred.y_true, GALLERY_EACH)
    wrong = pred.distinct(pred.wrong_largest_loss(), GALLERY_EACH)
    kept, unreadable = load_chosen(pred, correct + [int(i) for i in wrong], run.explained.preprocess.resize_size)
    overlays = explain_images(run, [image for _, image in kept], [int(pred.y_pred[i]) for i, _ in kept]) if kept else []
    # the overlay is the network's view: note an image the network saw enlarged
    network_px = run.preprocess.image_size
    cards = [card(pred, i, run.classes, image_uri(overlay, OVERLAY_PX), upscale_note(image.size, network_px))
             for (i, image), overlay in zip(kept, overlays, strict=True)]
    return {"correct": [c for c in cards if c["true"] == c["predicted"]],
            "wrong": [c for c in cards if c["true"] != c["predicted"]], "unreadable": unreadable}


def top_losses_section(pred: Predictions, classes: list[str]) -> dict:
    kept, unreadable = load_chosen(pred, [int(i) for i in pred.distinct(pred.wrong_largest_loss(), TOP_LOSSES)],
                                   THUMBNAIL_PX)
    cards = [card(pred, i, classes, image_uri(image), upscale_note(image.size, THUMBNAIL_PX)) for i, image in kept]
    return {"cards": cards, "wrong": int((pred.y_pred != pred.y_true).sum()), "unreadable": unreadable}


def similarity_section(run: Run, pred: Predictions) -> dict:
    """Cosine similarity of the run's embeddings of each class's most confidently recognised images."""
    n_classes = len(np.unique(pred.y_true))
    per_class = 2 if 2 * n_classes <= SIMILARITY_MAX else 1
    kept, unreadable = load_chosen(pred, [int(i) for i in pred.best_of_each_class(per_class, SIMILARITY_MAX)],
                                   SIMILARITY_PX)
    if len(kept) < 2:
        return {"missing": "fewer than two of the evaluated images can be read from here"}
    # of the regions that were evaluated: a boxed run's crops, as the thumbnails show them
    crops = [pred.crops[i] for i, _ in kept] if pred.crops else None
    paths = [pred.paths[i] for i, _ in kept]
    # Right after training, the features evaluation read (stage 1's cache for a pretrained backbone); else not
    # cached: a few dozen embeddings are cheap, and no other run shares this fine-tuned backbone's.
    embeddings = run.plain_features(paths, crops).numpy() if run.plain_features else \
        embed_images(run, paths, cache=False, crops=crops)
    matrix = cosine_matrix(embeddings)
    labels = numbered([run.classes[pred.y_true[i]] for i, _ in kept])
    uri = figure_uri(lambda out: plot_similarity(matrix, labels, out))
    thumbnails = [{"uri": image_uri(image, SIMILARITY_PX), "label": label, "name": Path(pred.paths[i]).name,
                   "note": upscale_note(image.size, SIMILARITY_PX)}
                  for (i, image), label in zip(kept, labels, strict=True)]
    omitted = max(0, n_classes - SIMILARITY_MAX)
    return {"uri": uri, "thumbnails": thumbnails, "omitted_classes": omitted, "unreadable": unreadable}


def numbered(labels: list[str]) -> list[str]:
    """'cat 1', 'cat 2' where a label repeats, so every row of the heatmap has its own name."""
    repeated = {label for label in labels if labels.count(label) > 1}
    seen: dict[str, int] = {}
    names = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        names.append(f"{label} {seen[label]}" if label in repeated else label)
    return names
