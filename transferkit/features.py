"""Frozen-backbone feature extraction on the fastest engine that matches eager PyTorch.

A frozen backbone is pure inference. On CPU, ONNX Runtime runs EfficientNet-Lite0 about twice as fast as eager
channels_last PyTorch (bench/ and README have the figures), so it is used whenever its output matches eager fp32
on the first batch; otherwise, or on CUDA, eager PyTorch in channels_last runs it.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from transferkit.data.loader import ImageDataset, make_loader
from transferkit.progress import Reporter

ENGINES = ("auto", "onnx", "torch")
PARITY_TOLERANCE = 1e-3  # max |feature difference| relative to the features' scale


class _Embed(nn.Module):
    """The classifier's `embed` as a module of its own, so the exported graph ends at the pooled features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)


def _eager(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    @torch.inference_mode()
    def run(images: torch.Tensor) -> torch.Tensor:
        return model.embed(images.contiguous(memory_format=torch.channels_last)).float()

    return run


def _onnx(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(folder) / "embed.onnx"
        torch.onnx.export(
            _Embed(model).eval(),
            (example,),
            str(path),
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": images.contiguous().numpy()})[0])

    return run


def feature_engine(model: nn.Module, example: torch.Tensor, engine: str, reporter: Reporter) -> tuple[Callable, str]:
    """Pick the engine; an ONNX engine must reproduce eager fp32 on `example` or it is not used."""
    model.eval()
    eager = _eager(model)
    if engine == "torch" or (engine == "auto" and next(model.parameters()).is_cuda):
        return eager, "torch"
    try:
        fast = _onnx(model, example)
        reference, candidate = eager(example), fast(example)
    except Exception as exc:  # noqa: BLE001 - any export/runtime failure means "use eager", with the reason
        reporter.warn(f"ONNX Runtime unavailable for this backbone ({type(exc).__name__}); using PyTorch")
        return eager, "torch"
    deviation = float((reference - candidate).abs().max()) / max(1.0, float(reference.abs().max()))
    if deviation > PARITY_TOLERANCE:
        reporter.warn(f"ONNX Runtime features differ from PyTorch by {deviation:.2e}; using PyTorch")
        return eager, "torch"
    reporter.log(f"feature engine: ONNX Runtime (max deviation from eager fp32 {deviation:.1e})")
    return fast, "onnx"


class FeatureExtractor:
    """Extracts pooled features view by view; the engine is chosen on the first batch and then reused."""

    def __init__(self, model: nn.Module, engine: str, batch_size: int, workers: int, reporter: Reporter) -> None:
        self.model, self.engine, self.batch_size, self.workers, self.reporter = (
            model,
            engine,
            batch_size,
            workers,
            reporter,
        )
        self._run: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(
        self,
        paths: Sequence[str],
        transforms: Sequence[Callable],
        description: str,
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        """Features of every image under each transform (one "view" each): a list of (N, D) tensors."""
        views = []
        for index, transform in enumerate(transforms):
            loader = make_loader(
                ImageDataset(paths, None, transform), self.batch_size, self.workers, generator=generator
            )
            chunks = []
            label = f"{description} {index + 1}/{len(transforms)}" if len(transforms) > 1 else description
            with self.reporter.bar(label, len(paths)) as advance:
                for images, _ in loader:
                    if self._run is None:
                        self._run, _ = feature_engine(self.model, images, self.engine, self.reporter)
                    chunks.append(self._run(images))
                    advance(images.shape[0])
            views.append(torch.cat(chunks))
        return views
