"""On a CUDA GPU (bench/gpu_check.sh runs these with `-m cuda`; `make test` deselects them): AMP training reaches
the CPU run's answers, and the CUDA features match the CPU's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from transferkit import api
from transferkit.runs.run import Run

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def gpu() -> None:
    # Selected only where a GPU is expected: its absence is a failure, not a skip.
    assert torch.cuda.is_available(), "no CUDA device: these tests run on a GPU machine (bench/gpu_check.sh)"


def test_amp_training_on_cuda_agrees_with_cpu(dataset: Path, tmp_path: Path, fast: dict) -> None:
    options = {**fast, "epochs_frozen": 5, "epochs_finetune": 2, "lr": 3e-2}
    on_gpu = api.train(dataset, tmp_path / "gpu", device="cuda", **options)
    on_cpu = api.train(dataset, tmp_path / "cpu", device="cpu", **options)
    paths = sorted(str(p) for p in dataset.rglob("*.png"))
    gpu_labels = Run(on_gpu.path).probabilities(paths).argmax(1)
    cpu_labels = Run(on_cpu.path).probabilities(paths).argmax(1)
    assert (gpu_labels == cpu_labels).mean() >= 0.9
    assert abs(on_gpu.metrics["accuracy"] - on_cpu.metrics["accuracy"]) <= 0.15


def test_cuda_features_match_cpu(tiny_weights: str) -> None:
    from transferkit.models.registry import create_imagenet_model, get_backbone

    model, _ = create_imagenet_model(get_backbone("test_efficientnet"), tiny_weights)
    model.eval()
    pixels = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = model.forward_features(pixels).mean((2, 3)).numpy()
        model = model.cuda().to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16):
            gpu = model.forward_features(pixels.cuda().to(memory_format=torch.channels_last)).mean((2, 3))
    gpu = gpu.float().cpu().numpy()
    cosine = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cosine.min() > 0.999
