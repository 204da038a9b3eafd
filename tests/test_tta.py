"""Test-time augmentation: the views are the symmetries they claim to be, and `tta: auto` picks the mode the
data calls for (the ONNX export's views are checked in test_run_choices)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from transferkit import api
from transferkit.data.transforms import RandomDihedral, symmetry
from transferkit.models import tta
from transferkit.options import AUGMENT_PRESETS
from transferkit.tuning import choose_tta


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=3).eval()


@torch.inference_mode()
def test_dihedral_average_is_invariant_to_rotating_and_mirroring_the_input(model):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    averaged = tta.tta_logits(model, images, "dihedral")
    for moved in (torch.rot90(images, 1, dims=(2, 3)), torch.rot90(images, 3, dims=(2, 3)), images.flip(2)):
        assert tta.tta_logits(model, moved, "dihedral") == pytest.approx(averaged, abs=1e-5)
    assert not torch.allclose(model(torch.rot90(images, 1, dims=(2, 3))), model(images), atol=1e-3)


@torch.inference_mode()
def test_flip_average_is_invariant_to_mirroring_only(model):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    averaged = tta.tta_logits(model, images, "flip")
    assert tta.tta_logits(model, images.flip(3), "flip") == pytest.approx(averaged, abs=1e-5)
    assert not torch.allclose(tta.tta_logits(model, images.flip(2), "flip"), averaged, atol=1e-3)
    assert tta.tta_logits(model, images, "none") == pytest.approx(model(images), abs=1e-6)


@torch.inference_mode()
def test_view_logits_give_every_mode_from_one_pass(model):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    modes = tta.per_mode(tta.ViewLogits(model, 8)(images))
    for mode in tta.MODES:
        assert modes[mode] == pytest.approx(tta.tta_logits(model, images, mode), abs=1e-5)


def synthetic_views(noise: float, anti: bool, n: int = 600) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One-logit views of calibrated binary logits: each view the truth plus its own noise, or (anti) every view
    after the first pointing the other way."""
    rng = np.random.default_rng(0)
    truth = rng.normal(scale=2.0, size=(n, 1))
    targets = (rng.random(n) < 1 / (1 + np.exp(-truth[:, 0]))).astype(int)
    views = truth[:, None, :] + rng.normal(scale=noise, size=(n, 8, 1))
    if anti:
        views[:, 1:] = -views[:, 1:]
    return {mode: v.numpy() for mode, v in tta.per_mode(torch.from_numpy(views)).items()}, targets


def test_auto_takes_the_views_that_average_noise_away():
    mode, losses = choose_tta(*synthetic_views(noise=2.0, anti=False), "binary")
    assert mode == "dihedral" and losses["dihedral"] < losses["flip"] < losses["none"]


def test_auto_keeps_no_views_when_the_views_contradict_the_image():
    mode, losses = choose_tta(*synthetic_views(noise=0.1, anti=True), "binary")
    assert mode == "none" and losses["none"] < losses["flip"]


def test_auto_keeps_the_cheaper_mode_on_a_tie():
    views, targets = synthetic_views(noise=0.0, anti=False)  # all views equal: nothing to gain
    assert choose_tta(views, targets, "binary")[0] == "none"


STRIPE_PERIOD = 12  # pixels: the tiny random backbone tells narrower diagonal stripes' direction apart poorly


def stripes(root: Path, kind: str, per_class: int = 60, size: int = 40) -> Path:
    """Two classes of stripes with random phase on noise: diagonal '/' vs '\\' (a mirror turns one into the
    other) or vertical vs horizontal (a mirror keeps each, a transpose swaps them)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:size, :size]
    for c, field in enumerate({"diagonal": [x + y, x - y], "axis": [x, y]}[kind]):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            bright = np.sin((field + rng.uniform(0, STRIPE_PERIOD)) * 2 * np.pi / STRIPE_PERIOD) > 0
            gray = (bright * 160 + rng.random((size, size)) * 60).astype(np.uint8)
            Image.fromarray(np.stack([gray] * 3, axis=-1)).save(folder / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("kind", ["diagonal", "axis"])
def test_auto_refuses_views_that_turn_one_class_into_the_other(kind, tmp_path, tiny_weights):
    api.train(stripes(tmp_path / "data", kind), tmp_path / "run", backbone="test_efficientnet", weights=tiny_weights,
              image_size=32, batch_size=8, workers=0, epochs_frozen=20, lr=1e-2, epochs_finetune=0, augment="none",
              quiet=True, tta="auto")
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    losses = meta["tta_selection"]["val_loss"]
    assert set(losses) == set(tta.MODES) and meta["tta_selection"]["seconds_per_view"] > 0
    if kind == "diagonal":  # a mirror swaps the classes: flip and dihedral average the evidence away
        assert losses["none"] < losses["flip"] - 0.05, "the run must have learned the stripes' direction"
        assert meta["tta"] == "none"
    else:  # a transpose swaps them: only dihedral averages the evidence away
        assert losses["none"] < losses["dihedral"] - 0.05, "the run must have learned the stripes' direction"
        assert meta["tta"] in ("none", "flip")


def test_symmetries_are_the_eight_of_the_square_and_the_views_of_tta() -> None:
    image = torch.arange(3 * 5 * 5, dtype=torch.float32).reshape(1, 3, 5, 5)
    seen = {tuple(symmetry(image, k).flatten().tolist()) for k in range(8)}
    assert len(seen) == 8  # all different: the dihedral group of order 8
    assert torch.equal(tta.views(image, 8), torch.cat([symmetry(image, k) for k in range(8)]))
    assert torch.equal(symmetry(symmetry(image, 4), 4), image)  # the transpose undoes itself


def test_random_dihedral_is_one_symmetry_decided_by_the_seed() -> None:
    image = torch.rand(3, 6, 6)
    torch.manual_seed(7)
    first = RandomDihedral()(image)
    torch.manual_seed(7)
    assert torch.equal(RandomDihedral()(image), first)  # resumed epochs replay the same augmentation
    assert any(torch.equal(first, symmetry(image, k)) for k in range(8))
    drawn = set()
    for seed in range(64):
        torch.manual_seed(seed)
        drawn.add(tuple(RandomDihedral()(image).flatten().tolist()))
    assert len(drawn) == 8


@pytest.mark.parametrize(("augment", "symmetries"), [("dihedral", 8), ("flip", 2)])
def test_symmetry_augmentation_trains_the_frozen_head_on_exactly_its_symmetries(dataset, tmp_path, fast, augment,
                                                                                symmetries) -> None:
    run = api.train(dataset, tmp_path / "run", **{**fast, "augment": augment, "epochs_finetune": 0,
                                                   "cache_dir": str(tmp_path / "cache")})
    spaces = [json.loads(path.read_text()) for path in (tmp_path / "cache").rglob("space.json")]
    views = sorted(str(space["view"]) for space in spaces if "view" in space)
    assert views == sorted(["0", *[f"dihedral{k}" for k in range(1, symmetries)]])  # view 1 is the mirror image
    assert run.meta["tta"] == "none"  # the test-time views are a separate choice (--tta)


def test_only_a_mirror_alone_or_dihedral_augmentation_has_exact_symmetries() -> None:
    assert [AUGMENT_PRESETS[name].exact_symmetries for name in ("dihedral", "flip", "light", "randaugment", "none")
            ] == [8, 2, 0, 0, 0]
    assert dataclasses.replace(AUGMENT_PRESETS["flip"], samplewise_center=True).exact_symmetries == 2
    assert dataclasses.replace(AUGMENT_PRESETS["flip"], zoom=0.1).exact_symmetries == 0  # random views then
