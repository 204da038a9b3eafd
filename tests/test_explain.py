"""Grad-CAM must point at the evidence: the real Lite0's heatmap for "tabby cat" peaks on a cat pasted into one
corner of an empty canvas, whichever corner; the binary sign convention and ViT token grids hold too."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import skimage.data
import timm
import torch
from PIL import Image

from transferkit.data.transforms import Preprocess, eval_transform
from transferkit.explain import gradcam, model_view, overlay
from transferkit.models.classifier import Classifier
from transferkit.models.registry import create_imagenet_model, get_backbone

TABBY = 281
CANVAS = 224
CAT_W, CAT_H = 112, 84  # a quarter of the canvas: the rest is flat grey, with nothing cat-like in it
LITE0_STRIDE = 32  # one cell of Lite0's 7x7 map: how far off a peak may be and still be "on the cat"


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
    cam = gradcam(model, inputs, [TABBY], binary=False)[0]
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
    as_class_1 = gradcam(binary, inputs, [1], binary=True)[0]
    torch.testing.assert_close(as_class_1, gradcam(model, inputs, [TABBY], binary=False)[0], atol=1e-4, rtol=1e-4)
    as_class_0 = gradcam(binary, inputs, [0], binary=True)[0]
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
    cams = gradcam(model, inputs, [0, 2], binary=False)
    assert cams.shape == (2, size, size)
    assert torch.isfinite(cams).all() and (cams.flatten(1).amax(1) == 1).all()  # not all zero: gradients arrived


def test_overlay_is_the_model_view_with_heat_on_top(lite0) -> None:
    _, pre = lite0
    view = model_view(cat_on_canvas(0, 0), pre)
    assert view.size == (CANVAS, CANVAS)
    cam = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    cam[:10, :10] = 1.0
    pixels = np.asarray(overlay(view, cam)).astype(int)
    # jet: 1.0 is red, 0.0 is blue; the grey canvas corner turns reddish where the heat is, bluish elsewhere.
    assert pixels[5, 5, 0] > pixels[5, 5, 2] and pixels[200, 200, 2] > pixels[200, 200, 0]
