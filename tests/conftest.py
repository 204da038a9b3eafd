"""Shared fixtures: generated image datasets and a tiny timm backbone with a weights file (no hub needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

# Test tiers: `make test` runs everything; `make test-fast` (about a minute) leaves out `slow`, `browser` and
# `distributed` tests. A module is slow unless listed here, so a new module never slows the fast tier by accident.
FAST_MODULES = {"test_boxes", "test_calibration", "test_config", "test_cpu", "test_docs", "test_fetch", "test_fileio",
                "test_images", "test_offline_weights", "test_prefix", "test_setup", "test_sources", "test_startup",
                "test_tta"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] not in FAST_MODULES:
            item.add_marker(pytest.mark.slow)


# Each class is a coloured square on noise: learnable by a tiny random network from pooled features.
COLOURS = [(230, 30, 30), (30, 200, 30), (40, 40, 230), (230, 230, 40), (200, 40, 200), (40, 220, 220)]


def make_image(class_index: int, rng: np.random.Generator, size: int = 40) -> Image.Image:
    pixels = (rng.random((size, size, 3)) * 90).astype(np.uint8)
    lo = int(rng.integers(2, size // 3))
    pixels[lo : lo + size // 2, lo : lo + size // 2] = COLOURS[class_index]
    return Image.fromarray(pixels)


def make_class_folders(root: Path, classes: int = 3, per_class: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(c, rng).save(folder / f"img_{i:03d}.png")
    return root


@pytest.fixture(autouse=True, scope="session")
def isolated_feature_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never read or fill the user's feature cache."""
    import os

    os.environ["TRANSFERKIT_CACHE"] = str(tmp_path_factory.mktemp("feature-cache"))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_class_folders(tmp_path / "data")


@pytest.fixture
def binary_dataset(tmp_path: Path) -> Path:
    return make_class_folders(tmp_path / "binary", classes=2, per_class=14)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """timm's test_efficientnet with seeded random 'ImageNet' weights, as a user's --weights file."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "test_efficientnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture
def fast(tiny_weights: str) -> dict:
    """Options for a training run that takes seconds on 2 CPU cores."""
    return dict(
        backbone="test_efficientnet",
        weights=tiny_weights,
        image_size=32,
        batch_size=8,
        workers=0,
        epochs_frozen=3,
        head_fit="sgd",  # stage 1 in epochs, which most tests of the training loop need; test_exact_head: the default
        epochs_finetune=1,
        augment="none",
        quiet=True,
    )


@pytest.fixture(scope="session")
def crippled_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """test_efficientnet_gn (as many parameters as test_efficientnet) with every tensor zeroed: constant features,
    nothing to transfer."""
    model = timm.create_model("test_efficientnet_gn", pretrained=False)
    path = tmp_path_factory.mktemp("crippled") / "zeroed.safetensors"
    save_file({k: torch.zeros_like(v).contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)
