"""Grad-CAM must point at the evidence: the real Lite0's heatmap for "tabby cat" peaks on a cat pasted into one
corner of an empty canvas, whichever corner; a trained run's heatmap for "patch" peaks on the bright patch that
decides its class; the binary sign convention and ViT token grids (the registry's Grad-CAM layer) hold too."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import make_class_folders
from transferkit import api
from transferkit.data.images import load_rgb
from transferkit.data.transforms import Preprocess, eval_transform
from transferkit.insight.explain import explain_files, gradcam, model_view, overlay
from transferkit.models.classifier import Classifier
from transferkit.models.registry import create_imagenet_model, get_backbone, gradcam_layer
from transferkit.runs.run import Run
from transferkit.task.kinds import Binary, MultiClass

TABBY = 281
IMAGENET = MultiClass([str(i) for i in range(1000)])  # the head is Lite0's own ImageNet layer
BINARY = Binary(["other", "tabby"])
CANVAS = 224
CAT_W, CAT_H = 112, 84  # a quarter of the canvas: the rest is flat grey, with nothing cat-like in it
LITE0_STRIDE = 32  # one cell of Lite0's 7x7 map: how far off a peak may be and still be "on the cat"
PATCH_IMAGE, PATCH = 64, 16  # generated images and the bright square that makes one "patch"
UPSCALE = 2  # the patch run sees 128 px inputs: a 4x4 feature map, one cell per patch width of the 64 px image


@pytest.fixture(scope="module")
def lite0() -> tuple[Classifier, Preprocess]:
    """The ImageNet Lite0 as a Classifier whose head is its own 1000-class layer: real weights, known classes."""
    imagenet, _ = create_imagenet_model(get_backbone("tf_efficientnet_lite0"))
    head = copy.deepcopy(imagenet.classifier)
    imagenet.reset_classifier(0)
    pre = Preprocess.from_timm_config(imagenet.pretrained_cfg)
    # crop_pct 1: the canvas fills the input exactly, so canvas and heatmap coordinates coincide.
    return Classifier(imagenet, head).eval(), dataclasses.replace(pre, crop_pct=1.0)


def cat_on_canvas(left: int, top: int) -> Image.Image:
    canvas = Image.new("RGB", (CANVAS, CANVAS), (128, 128, 128))
    canvas.paste(Image.fromarray(skimage.data.chelsea()).resize((CAT_W, CAT_H)), (left, top))
    return canvas


def peak(cam: torch.Tensor) -> tuple[int, int]:
    y, x = np.unravel_index(int(cam.argmax()), tuple(cam.shape))
    return int(x), int(y)


@pytest.mark.parametrize("corner", [(0, 0), (CANVAS - CAT_W, CANVAS - CAT_H)], ids=["top-left", "bottom-right"])
def test_heatmap_peak_lies_on_the_cat(lite0, corner: tuple[int, int]) -> None:
    model, pre = lite0
    left, top = corner
    inputs = eval_transform(pre)(cat_on_canvas(left, top))[None]
    cam = gradcam(model, inputs, [TABBY], IMAGENET)[0]
    assert cam.shape == (CANVAS, CANVAS) and float(cam.min()) >= 0 and float(cam.max()) == pytest.approx(1.0)
    x, y = peak(cam)
    margin = LITE0_STRIDE // 2
    assert left - margin <= x <= left + CAT_W + margin and top - margin <= y <= top + CAT_H + margin, (x, y)
    # Most of the heat is on the cat, not spread over the grey canvas.
    on_cat = cam[top : top + CAT_H, left : left + CAT_W].sum() / cam.sum()
    assert on_cat > 0.5, float(on_cat)


def test_binary_logit_explains_class_1_as_is_and_class_0_with_the_sign_flipped(lite0) -> None:
    """One logit means class 1 (logit > 0); class 0's evidence is the negated logit's, so its map must differ."""
    model, pre = lite0
    binary = Classifier(model.backbone, torch.nn.Linear(model.head.in_features, 1)).eval()
    binary.head.weight.data = model.head.weight.data[TABBY : TABBY + 1].clone()
    binary.head.bias.data = model.head.bias.data[TABBY : TABBY + 1].clone()
    inputs = eval_transform(pre)(cat_on_canvas(0, 0))[None]
    as_class_1 = gradcam(binary, inputs, [1], BINARY)[0]
    torch.testing.assert_close(as_class_1, gradcam(model, inputs, [TABBY], IMAGENET)[0], atol=1e-4, rtol=1e-4)
    as_class_0 = gradcam(binary, inputs, [0], BINARY)[0]
    cat = (slice(0, CAT_H), slice(0, CAT_W))
    assert as_class_0[cat].mean() < as_class_1[cat].mean()


def test_vit_tokens_become_a_grid_without_the_class_token() -> None:
    """A class-token ViT: final patch tokens never reach the head, so the map comes from the last block's input
    side; prefix tokens are dropped before the tokens are laid on the patch grid."""
    torch.manual_seed(0)
    backbone = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    assert backbone.num_prefix_tokens == 1 and backbone.global_pool == "token"
    model = Classifier(backbone, torch.nn.Linear(backbone.num_features, 3)).eval()
    size = backbone.pretrained_cfg["input_size"][-1]
    inputs = torch.randn(2, 3, size, size)
    cams = gradcam(model, inputs, [0, 2], IMAGENET)
    assert cams.shape == (2, size, size)
    assert torch.isfinite(cams).all() and (cams.flatten(1).amax(1) == 1).all()  # not all zero: gradients arrived


def test_overlay_is_the_model_view_with_heat_on_top(lite0) -> None:
    _, pre = lite0
    view = model_view(cat_on_canvas(0, 0), pre)
    assert view.size == (CANVAS, CANVAS)
    cam = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    cam[:10, :10] = 1.0
    pixels = np.asarray(overlay(view, cam)).astype(int)
    # inferno's 1.0 is bright yellow: the grey canvas corner turns yellowish where the heat is
    assert pixels[5, 5, 0] > pixels[5, 5, 2] + 40 and pixels[5, 5, 1] > pixels[5, 5, 2]
    # no evidence, no tint: the photo keeps its own colours there (jet washed everything blue)
    assert np.abs(pixels[200, 200] - np.asarray(view).astype(int)[200, 200]).max() <= 1


def test_overlay_keeps_a_green_photo_green_where_the_evidence_is_weak() -> None:
    green = Image.new("RGB", (64, 64), (60, 160, 50))  # a green pepper
    cam = np.full((64, 64), 0.15, dtype=np.float32)  # jet tinted this blue-grey
    r, g, b = np.asarray(overlay(green, cam))[32, 32].astype(int)
    assert g > r and g > b


def patch_image(rng: np.random.Generator, with_patch: bool) -> tuple[Image.Image, tuple[int, int] | None]:
    """Dim noise, plus (for class "patch") one bright square somewhere: the only evidence for the class."""
    pixels = (40 + rng.random((PATCH_IMAGE, PATCH_IMAGE, 3)) * 20).astype(np.uint8)
    if not with_patch:
        return Image.fromarray(pixels), None
    left, top = (int(v) for v in rng.integers(0, PATCH_IMAGE - PATCH, 2))
    pixels[top : top + PATCH, left : left + PATCH] = 255
    return Image.fromarray(pixels), (left, top)


@pytest.fixture(scope="module", params=["max", "avg"])
def patch_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_weights: str
              ) -> tuple[Run, dict[str, tuple[int, int]]]:
    """A run that tells "patch" from "plain" images, and where each patch image's square is, its feature maps pooled
    by their maximum (the default) or their average (each weighs Grad-CAM's map its own way). Seconds."""
    root = tmp_path_factory.mktemp("patch")
    rng = np.random.default_rng(1)
    squares = {}
    for label in ("patch", "plain"):
        (root / "data" / label).mkdir(parents=True)
        for i in range(16):
            image, square = patch_image(rng, label == "patch")
            image.save(path := root / "data" / label / f"{i:02d}.png")
            if square:
                squares[str(path)] = square
    # crop_pct 1: the whole image is resized to the input, so input coordinates are image coordinates x UPSCALE.
    run = api.train(root / "data", root / "run", backbone="test_efficientnet", weights=tiny_weights,
                    image_size=PATCH_IMAGE * UPSCALE, crop_pct=1.0, batch_size=8, workers=0, epochs_frozen=15,
                    epochs_finetune=0, lr=0.03, patience=0, augment="none", pool=request.param, quiet=True)
    assert run.metrics["accuracy"] == 1.0
    return run, squares


def test_trained_run_heatmap_peaks_on_the_patch_that_decides_the_class(patch_run) -> None:
    run, squares = patch_run
    inputs = torch.stack([run.transform(load_rgb(path)) for path in squares])
    cams = gradcam(run.model, inputs, [run.classes.index("patch")] * len(squares), run.task)
    cell = LITE0_STRIDE // UPSCALE  # one feature-map cell, in image pixels
    shares = []
    for cam, (left, top) in zip(cams, squares.values(), strict=True):
        x, y = (v // UPSCALE for v in peak(cam))
        # A 4x4 map places its peak at a cell's centre: within one cell of the square counts as on it.
        assert left - cell <= x < left + PATCH + cell and top - cell <= y < top + PATCH + cell, ((x, y), (left, top))
        box = cam[top * UPSCALE : (top + PATCH) * UPSCALE, left * UPSCALE : (left + PATCH) * UPSCALE]
        shares.append(float(box.sum() / cam.sum()))
    # The square is 1/16 of the image; it holds several times that share of the heat.
    assert np.mean(shares) > 2.5 * (PATCH / PATCH_IMAGE) ** 2, shares


def test_explain_files_writes_overlays_for_the_predicted_or_the_asked_class(patch_run, tmp_path: Path) -> None:
    run, squares = patch_run
    paths = list(squares)[:2]
    results = explain_files(run, paths, tmp_path / "out")
    assert [r["label"] for r in results] == [p["label"] for p in run.predict(paths)[0]] == ["patch", "patch"]
    assert all(r["explained"] == "patch" and r["probability"] > 0.5 for r in results)
    for result in results:
        with Image.open(result["overlay"]) as image:
            assert image.size == (run.preprocess.image_size,) * 2
    [plain] = explain_files(run, paths[:1], tmp_path / "other", run.classes.index("plain"))
    assert plain["explained"] == "plain" and plain["label"] == "patch"
    assert not np.array_equal(np.asarray(Image.open(plain["overlay"])), np.asarray(Image.open(results[0]["overlay"])))


def test_registry_names_the_gradcam_layer() -> None:
    """CNN: None (forward_features' final map). ViT: the last block's first norm, whose tokens still feed the
    class token."""
    cnn = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=0)
    assert gradcam_layer(cnn) is None
    assert gradcam_layer(vit) is vit.blocks[-1].norm1


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A run on timm's test_vit from a --weights safetensors file (no hub), at 64 px: a 4x4 token grid."""
    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    weights = root / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit").state_dict().items()}, str(weights))
    data = make_class_folders(root / "data", classes=2, per_class=6)
    return api.train(data, root / "run", backbone="test_vit", weights=str(weights), image_size=64, batch_size=8,
                     workers=0, epochs_frozen=2, epochs_finetune=1, feature_engine="torch", augment="none",
                     quiet=True)


def test_vit_run_heatmap_has_the_input_shape_and_is_not_blank(vit_run: Run, tmp_path: Path) -> None:
    images = sorted(str(p) for p in (vit_run.path.parent / "data").rglob("*.png"))[:3]
    inputs = torch.stack([vit_run.transform(load_rgb(path)) for path in images])
    predicted = vit_run.probabilities(images).argmax(axis=1).tolist()  # a class with evidence for it somewhere
    cams = gradcam(vit_run.model, inputs, predicted, vit_run.task)
    assert cams.shape == (3, 64, 64)
    assert torch.isfinite(cams).all() and (cams.flatten(1).amax(1) == 1).all()
    assert (cams.flatten(1).std(1) > 0).all()  # a map with structure, not one flat value
    [result] = explain_files(vit_run, images[:1], tmp_path)
    with Image.open(result["overlay"]) as image:
        assert image.size == (64, 64)
