"""Frozen-backbone feature extraction on the fastest engine that matches eager PyTorch.

A frozen backbone is pure inference, and on CPU OpenVINO and ONNX Runtime run it several times faster than eager
PyTorch (decision 0214; figures in BENCHMARKS.md), so `auto` takes the first of OpenVINO, ONNX Runtime and eager
PyTorch that is installed and reproduces eager fp32 on the first batch. On CUDA, eager PyTorch in channels_last runs
it.
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2 as T

from transferkit.data.boxes import Box
from transferkit.data.content import file_digest
from transferkit.data.loader import ImageDataset, make_loader
from transferkit.data.transforms import Preprocess, Symmetry, eval_transform
from transferkit.errors import UserError
from transferkit.features.cache import ArrayTable, FeatureStore, FeatureTable, module_digest
from transferkit.progress import Reporter

ENGINE_NAMES = {"openvino": "OpenVINO", "onnx": "ONNX Runtime", "torch": "PyTorch"}
PARITY_TOLERANCE = 1e-3  # max |feature difference| relative to the features' scale
PARITY_IMAGES = 8  # compared with eager fp32 before a compiled engine is trusted (eager on a full batch costs memory)
ORT_BATCH = 8  # images per ONNX Runtime call (see _onnx)
OPENVINO_BATCH = 4  # images per OpenVINO request: small requests keep the streams busy (decision 0214)

Engine = Callable[[torch.Tensor], torch.Tensor]


class _Embed(nn.Module):
    """The classifier's `embed` as a module of its own, so the exported graph ends at the pooled features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)


def _eager(module: nn.Module) -> Engine:
    device = next(module.parameters()).device

    @torch.inference_mode()
    def run(images: torch.Tensor) -> torch.Tensor:
        return module(images.to(device).contiguous(memory_format=torch.channels_last)).float().cpu()

    return run


@contextmanager
def _exported(module: nn.Module, example: torch.Tensor) -> Iterator[str]:
    """`module` (images -> one tensor) as a temporary ONNX file with a dynamic batch axis, for an engine to load."""
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(folder) / "module.onnx"
        # One image is enough to trace (the batch axis is dynamic); a full batch costs ~2.5 GB more to export.
        torch.onnx.export(
            module,
            (example[:1].to(next(module.parameters()).device),),
            str(path),
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        yield str(path)


def _onnx(module: nn.Module, example: torch.Tensor) -> Engine:
    import onnxruntime as ort

    with _exported(module, example) as path:
        options = ort.SessionOptions()
        # Spin-waiting threads hold the cores between batches, which the loader's decoding workers need (decision 0214).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        # ONNX Runtime's arena grows to the largest batch it has seen while small batches run as fast (decision 0214).
        chunks = images.contiguous().numpy()
        return torch.from_numpy(np.concatenate([session.run(None, {"images": chunks[i : i + ORT_BATCH]})[0]
                                                for i in range(0, len(chunks), ORT_BATCH)]))

    return run


@functools.cache
def _openvino_core():
    """One OpenVINO Core for the process, never released: each Core's CPU plugin replaces the calling thread's
    signal stack and unmaps it when released, and Cores released out of order left the thread's next signal handler
    an unmapped stack (SIGSEGV; decision 0290)."""
    import openvino as ov

    return ov.Core()


def _openvino(module: nn.Module, example: torch.Tensor) -> Engine:
    import openvino as ov

    with _exported(module, example) as path:
        # f32 explicitly: on CPUs with bf16 OpenVINO would run in bf16, faster but off fp32's features; the throughput
        # hint's parallel streams keep depthwise convolutions busier than one stream on all cores (decision 0214).
        compiled = _openvino_core().compile_model(path, "CPU", {
            "PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    queue = ov.AsyncInferQueue(compiled)

    def run(images: torch.Tensor) -> torch.Tensor:
        pixels = images.contiguous().numpy()
        starts = range(0, len(pixels), OPENVINO_BATCH)
        results: list[np.ndarray | None] = [None] * len(starts)

        def store(request, slot: int) -> None:
            results[slot] = request.get_output_tensor(0).data.copy()  # the request's buffer is reused

        queue.set_callback(store)
        for slot, start in enumerate(starts):  # the requests run in parallel, one per stream
            queue.start_async({0: pixels[start : start + OPENVINO_BATCH]}, slot)
        queue.wait_all()
        return torch.from_numpy(np.concatenate(results))

    return run


COMPILED_ENGINES: dict[str, Callable[[nn.Module, torch.Tensor], Engine]] = {"openvino": _openvino, "onnx": _onnx}


def feature_engine(model: nn.Module, example: torch.Tensor, engine: str, reporter: Reporter) -> tuple[Engine, str]:
    """The engine for the classifier's pooled backbone features, and its name (see `inference_engine`)."""
    return inference_engine(_Embed(model), example, engine, reporter, "features")


def inference_engine(module: nn.Module, example: torch.Tensor, engine: str, reporter: Reporter, what: str
                     ) -> tuple[Engine, str]:
    """A frozen `module` (images -> one tensor) on `engine`, and the engine's name: for `auto`, the first compiled
    engine (OpenVINO, then ONNX Runtime) that runs here, on CPU; a compiled engine must reproduce eager fp32 on
    `example` or PyTorch runs instead. `what` names the output in messages."""
    module.eval()
    eager = _eager(module)
    if engine == "torch" or (engine == "auto" and next(module.parameters()).is_cuda):
        return eager, "torch"
    example = example[:PARITY_IMAGES]
    reference = eager(example)
    require_finite(reference, "sample images")
    for name in COMPILED_ENGINES if engine == "auto" else [engine]:
        label = ENGINE_NAMES[name]
        try:
            fast = COMPILED_ENGINES[name](module, example)
            candidate = fast(example)
        except Exception as exc:  # noqa: BLE001 - a missing package or an export/runtime failure: the next engine
            reporter.warn(f"{label} unavailable for this backbone ({type(exc).__name__}: {exc})"[:200])
            continue
        deviation = float((reference - candidate).abs().max()) / max(1.0, float(reference.abs().max()))
        if not deviation <= PARITY_TOLERANCE:  # NaN too: an engine that hides PyTorch's NaN proves nothing
            reporter.warn(f"{label} {what} differ from PyTorch by {deviation:.2e}; not used")
            continue
        reporter.log(f"{what} engine: {label} (max deviation from eager fp32 {deviation:.1e})")
        return fast, name
    reporter.warn(f"using PyTorch for the {what}")
    return eager, "torch"


@dataclass(frozen=True)
class View:
    """One way of showing every image to the frozen backbone: the clean image, or augmented copy k.

    `spec` is everything that decides the view's pixels (preprocessing, augmentation, k) and so its cache key;
    augmented copies are seeded from the image content and k, so a cached view equals a recomputed one."""

    index: int
    transform: Callable
    spec: dict


def view_spec(pre: Preprocess, samplewise_center: bool) -> dict:
    """What every view's pixels depend on besides the view itself (part of the cache key). `decode`: JPEGs are
    decoded at a reduced scale since decision 0295, which changes the pixels of large ones."""
    return {"preprocess": pre.to_dict(), "samplewise_center": samplewise_center, "decode": "scaled"}


def clean_view(pre: Preprocess, samplewise_center: bool = False) -> View:
    """View 0, the image as evaluation sees it. Training's frozen stage, auto, doctor and the embedding commands
    all key it this way, so each reads the rows another one cached."""
    return View(0, eval_transform(pre, samplewise_center), {**view_spec(pre, samplewise_center), "view": 0})


def symmetry_view(pre: Preprocess, samplewise_center: bool, k: int) -> View:
    """The clean image under the k-th symmetry of the square (k = 0: the clean view itself): the frozen stage's
    views with `augment: dihedral`, and test-time augmentation's views when they come from the feature engine."""
    if k == 0:
        return clean_view(pre, samplewise_center)
    transform = T.Compose([eval_transform(pre, samplewise_center), Symmetry(k)])
    return View(k, transform, {**view_spec(pre, samplewise_center), "view": f"dihedral{k}"})


def view_seed(content_digest: str, view_index: int) -> int:
    return int(content_digest[:8], 16) ^ (view_index * 0x9E3779B1 & 0x7FFFFFFF)


def image_key(content_digest: str, crop: Box | None) -> str:
    """What the backbone sees of a file: its content, or the region of it that is cropped (one file with two
    boxes is two images). Uncropped images keep the bare content digest, so their cached features stay valid."""
    if crop is None:
        return content_digest
    return hashlib.sha256(f"{content_digest}/crop {crop.key()}".encode()).hexdigest()[:32]


class FeatureExtractor:
    """Features of images under views, from the cache where present; only missing ones reach the engine,
    which is chosen on the first batch that needs it and then reused."""

    def __init__(self, model: nn.Module, engine: str, batch_size: int, workers: int, reporter: Reporter,
                 cache_root: Path | None) -> None:
        self.model, self.engine, self.batch_size, self.workers = model, engine, batch_size, workers
        self.reporter, self.cache_root = reporter, cache_root
        self.backbone_digest = module_digest(model.backbone) if cache_root else ""
        self.computed = 0  # images that went through the backbone (the rest came from the cache)
        self.setup_seconds = 0.0  # what choosing the engine took on the first batch (export, compilation, parity)
        self._run: Engine | None = None

    def __call__(self, paths: Sequence[str], views: Sequence[View], description: str,
                 crops: Sequence[Box | None] | None = None) -> list[torch.Tensor]:
        """A (N, D) tensor per view, rows in the order of `paths`."""
        return [torch.from_numpy(table.take(np.arange(len(table))))
                for table in self.tables(paths, views, description, crops)]

    def tables(self, paths: Sequence[str], views: Sequence[View], description: str,
               crops: Sequence[Box | None] | None = None) -> list[FeatureTable]:
        """A table per view, rows in the order of `paths` (each cropped to its region in `crops`, if given); with
        the cache on, the rows stay on disk."""
        crops = list(crops) if crops is not None else [None] * len(paths)
        digests = [image_key(file_digest(p), crop) for p, crop in zip(paths, crops, strict=True)]
        results = []
        for position, view in enumerate(views, 1):
            label = f"{description} {position}/{len(views)}" if len(views) > 1 else description
            results.append(self._view(paths, crops, digests, view, label))
        return results

    def _view(self, paths: Sequence[str], crops: list[Box | None], digests: list[str], view: View, label: str
              ) -> FeatureTable:
        seeds = [view_seed(d, view.index) for d in digests]
        if not self.cache_root:
            rows = RowCollector(len(paths))
            self._compute(list(paths), crops, seeds, view.transform, label, rows.write)
            return ArrayTable(rows.array)
        space = {"backbone": self.backbone_digest, "timm": self.model.backbone.default_cfg.get("architecture"),
                 **view.spec}
        if getattr(self.model, "depths", ()):  # multi-depth features are another space (last-layer keys unchanged)
            space["depths"] = list(self.model.depths)
        if getattr(self.model, "global_pool", None) == "max":  # so are max-pooled ones (average-pooled keys unchanged)
            space["pool"] = "max"
        store = FeatureStore(self.cache_root, space, self.reporter)
        first_missing = {d: i for i, d in reversed(list(enumerate(digests))) if d not in store.rows}
        missing = sorted(first_missing.values())  # identical files are computed once
        if missing:
            with store.writer([digests[i] for i in missing]) as shard:
                self._compute([paths[i] for i in missing], [crops[i] for i in missing], [seeds[i] for i in missing],
                              view.transform, label, shard.write)
        return store.table(digests)

    def _compute(self, paths: list[str], crops: list[Box | None], seeds: list[int], transform: Callable, label: str,
                 sink: Callable[[np.ndarray], None]) -> None:
        """Features of `paths` (cropped to `crops`), batch by batch into `sink`, in order."""
        if not paths:
            return
        loader = make_loader(ImageDataset(paths, None, transform, seeds, crops), self.batch_size, self.workers)
        with self.reporter.bar(label, len(paths)) as advance:
            for images, _ in loader:
                if self._run is None:
                    start = time.perf_counter()
                    self._run, _ = feature_engine(self.model, images, self.engine, self.reporter)
                    self.setup_seconds = time.perf_counter() - start
                sink(self._run(images).numpy())
                advance(images.shape[0])
        self.computed += len(paths)


class RowCollector:
    """Batches of rows into one preallocated array (no list of chunks and a concatenated copy)."""

    def __init__(self, rows: int) -> None:
        self.rows, self.written = rows, 0
        self.array = np.empty((rows, 0), dtype=np.float32)

    def write(self, features: np.ndarray) -> None:
        if self.written == 0:
            self.array = np.empty((self.rows, features.shape[1]), dtype=np.float32)
        self.array[self.written : self.written + len(features)] = features
        self.written += len(features)


FeaturesOf = Callable[[Sequence[str], Sequence[Box | None] | None], torch.Tensor]


def view_features(view: View, extract: FeatureExtractor, description: str = "evaluation") -> FeaturesOf:
    """The (N, D) pooled features of image files (cropped to `crops`) under one view, from the engine and the cache:
    what the report's similarity heatmap and `head_logits` read."""

    def features(paths: Sequence[str], crops: Sequence[Box | None] | None = None) -> torch.Tensor:
        [rows] = extract(paths, [view], description, crops)
        return rows

    return features


# (paths, crops, views) -> (N, views, classes): the logits of the first `views` symmetries of each image
ViewLogitsOf = Callable[[Sequence[str], Sequence[Box | None] | None, int], torch.Tensor]


def head_logits(model: nn.Module, pre: Preprocess, samplewise_center: bool, extract: FeatureExtractor
                ) -> ViewLogitsOf:
    """The classifier's logits as head(features), the features from the engine and the cache instead of an eager
    forward pass: the same function (the engine is parity-checked), several times faster, and free where stage 1
    already cached them. Evaluation after training and the choices made on validation use it, test-time views
    included (the symmetries of `models.tta`, in its order)."""

    def logits(paths: Sequence[str], crops: Sequence[Box | None] | None = None, views: int = 1) -> torch.Tensor:
        chosen = [symmetry_view(pre, samplewise_center, k) for k in range(views)]
        tables = extract(paths, chosen, "evaluation", crops)
        with torch.no_grad():
            head = model.head.eval()
            return torch.stack([head(features) for features in tables], dim=1)

    return logits


def require_finite(features: torch.Tensor, images: str) -> None:
    """One line, instead of a model fitted on NaN, when the backbone's outputs are not finite (damaged weights)."""
    broken = int((~torch.isfinite(features.reshape(len(features), -1)).all(dim=1)).sum())
    if broken:
        raise UserError(f"the backbone gives features that are not finite (NaN or infinite) for {broken} of "
                        f"{len(features)} {images}: its weights are damaged (check --weights)")
