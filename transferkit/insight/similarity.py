"""Image embeddings (a network's pooled pre-head features), cosine similarity between them, and nearest neighbours.

A trained run embeds with its own fine-tuned backbone; `--backbone NAME` embeds with the untouched ImageNet one.
Both go through the feature cache: its key holds a digest of the backbone's weights, so the two never share rows,
and an unchanged backbone shares the clean view its training already cached.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
from torch import nn  # noqa: E402

from transferkit.data.boxes import Box  # noqa: E402
from transferkit.data.sources import Skipped, scan_dataset  # noqa: E402
from transferkit.data.transforms import Preprocess  # noqa: E402
from transferkit.features.cache import cache_root  # noqa: E402
from transferkit.features.extract import FeatureExtractor, View, clean_view  # noqa: E402
from transferkit.fileio import atomic_write  # noqa: E402
from transferkit.insight.embedding_files import check_embeddings_path  # noqa: E402
from transferkit.models.classifier import Classifier, drop_top  # noqa: E402
from transferkit.models.registry import create_imagenet_model, get_backbone  # noqa: E402
from transferkit.prediction import collect_images  # noqa: E402
from transferkit.progress import Reporter  # noqa: E402
from transferkit.runs.run import Run  # noqa: E402

BATCH_SIZE = 32
# Decoding workers and an ONNX export (with its parity check) each cost seconds before the first image; they are
# only worth starting for many images (run.image_loader starts workers from the same count, 4 batches).
MANY_IMAGES = 4 * BATCH_SIZE
ANNOTATE_MAX = 16  # above this many images the numbers in the heatmap's cells are too small to read
TICKS_MAX = 80  # above this many, file names on the axes overlap into a black bar
FIGURE_MAX_INCHES = 24.0  # keeps the PNG of a large matrix to a few megapixels
SHORT_NAME_MAX = 24


@dataclass(frozen=True)
class EmbeddingSource:
    """A network whose pooled pre-head features are the embeddings, and the eval preprocessing it expects."""

    model: Classifier
    preprocess: Preprocess
    samplewise_center: bool = False

    def view(self) -> View:
        # training's clean view, so a backbone left as trained reuses the features cached then
        return clean_view(self.preprocess, self.samplewise_center)


def run_source(run: Run) -> EmbeddingSource:
    """Embeddings from a trained run's classifier (its fine-tuned backbone)."""
    return EmbeddingSource(run.model, run.preprocess, bool(run.meta.get("samplewise_center", False)))


def backbone_source(name: str, weights: str | None = None) -> EmbeddingSource:
    """Embeddings from the untouched ImageNet backbone (timm's pooled features), without any run."""
    imagenet_model, _ = create_imagenet_model(get_backbone(name), weights)
    # timm's own global pooling, as before decision 0298: forward_head now ends at the pooled features
    pooled_by = drop_top(imagenet_model, None)
    pre = Preprocess.from_timm_config(imagenet_model.pretrained_cfg)
    return EmbeddingSource(Classifier(imagenet_model, nn.Identity(), global_pool=pooled_by).eval(), pre)


class Embedder:
    """L2-normalised embeddings of image files from one source; only images the cache lacks reach the network."""

    def __init__(self, source: EmbeddingSource, cache_dir: Path | None, reporter: Reporter | None = None) -> None:
        self.source, self.cache_dir = source, cache_dir
        self.reporter = reporter or Reporter(quiet=True)
        self.computed = 0  # images that went through the network, over every call

    def __call__(self, paths: list[str], description: str = "embeddings",
                 crops: list[Box | None] | None = None) -> np.ndarray:
        """One row per path, of the image cropped to its region in `crops` where given."""
        if not paths:
            return np.empty((0, self.source.model.num_features), dtype=np.float32)
        many = len(paths) >= MANY_IMAGES
        extract = FeatureExtractor(self.source.model, "auto" if many else "torch", BATCH_SIZE, 2 if many else 0,
                                   self.reporter, self.cache_dir)
        [features] = extract(paths, [self.source.view()], description, crops)
        self.computed += extract.computed
        return l2_normalise(features.numpy())


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def embed_images(run: Run, paths: list[str], *, cache: bool = True, cache_dir: str | Path | None = None,
                 reporter: Reporter | None = None, crops: list[Box | None] | None = None) -> np.ndarray:
    """(N, D) L2-normalised embeddings of readable image files (cropped to `crops`, boxed data) from the run's
    classifier, in eval preprocessing."""
    return Embedder(run_source(run), cache_root(cache, cache_dir), reporter)(paths, crops=crops)


def cosine_matrix(embeddings: np.ndarray) -> np.ndarray:
    """(N, N) cosine similarities, exactly symmetric, in [-1, 1]."""
    unit = l2_normalise(np.asarray(embeddings, dtype=np.float32))
    matrix = unit @ unit.T
    return np.clip((matrix + matrix.T) / 2, -1.0, 1.0)


def nearest(query: np.ndarray, gallery: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k gallery rows most cosine-similar to one query vector, best first: (row, similarity)."""
    similarities = l2_normalise(np.asarray(gallery, dtype=np.float32)) @ l2_normalise(query[None])[0]
    order = np.argsort(-similarities, kind="stable")[:k]
    return [(int(i), float(similarities[i])) for i in order]


def labelled_images(data: str) -> tuple[list[str], list[str], list[Skipped]]:
    """Image paths and labels of a dataset (CSV, class or split folders), or of a plain folder of images (labels
    empty), plus what was skipped and why."""
    folder = Path(data)
    if folder.is_dir() and not any(child.is_dir() and not child.name.startswith(".") for child in folder.iterdir()):
        paths, skipped = collect_images([data])
        return paths, [""] * len(paths), skipped
    index = scan_dataset(data, trainable=False)
    return [s.path for s in index.samples], [s.label for s in index.samples], index.skipped


def write_embeddings(path: Path, embeddings: np.ndarray, paths: list[str], labels: list[str]) -> None:
    """Rows of (embedding, path, label) as .npz arrays or a .parquet table, written atomically."""
    check_embeddings_path(path)
    buffer = io.BytesIO()
    if path.suffix.lower() == ".npz":
        np.savez(buffer, embeddings=embeddings, paths=np.array(paths, dtype=str), labels=np.array(labels, dtype=str))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        vectors = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel(), pa.float32()), embeddings.shape[1])
        pq.write_table(pa.table({"path": paths, "label": labels, "embedding": vectors}), buffer)
    atomic_write(path, buffer.getvalue())


def short_names(paths: list[str]) -> list[str]:
    """File names for tick labels; names that occur twice keep their folder (class_0/img.png), long ones their end."""
    counts = Counter(Path(p).name for p in paths)
    names = [Path(p).name if counts[Path(p).name] == 1 else "/".join(Path(p).parts[-2:]) for p in paths]
    return [n if len(n) <= SHORT_NAME_MAX else "…" + n[-(SHORT_NAME_MAX - 1) :] for n in names]


def plot_similarity(matrix: np.ndarray, labels: list[str], out: str | Path | BinaryIO) -> None:
    """An annotated heatmap PNG of a cosine matrix (the Keras pets tutorial's figure); `labels` name the rows."""
    matrix = np.asarray(matrix)
    count = len(labels)
    size = min(max(4.0, 0.45 * count + 2.5), FIGURE_MAX_INCHES)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="viridis", vmin=min(0.0, float(matrix.min())), vmax=1.0)
    if count <= TICKS_MAX:
        ticks, names = np.arange(count), short_names(labels)
        ax.set_xticks(ticks, names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(ticks, names, fontsize=8)
    if count <= ANNOTATE_MAX:
        for i, j in np.ndindex(matrix.shape):
            # viridis is dark at the bottom of its scale: white text there, black on the bright top
            colour = "black" if image.norm(matrix[i, j]) > 0.6 else "white"
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ax.set_title("cosine similarity of embeddings")
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
