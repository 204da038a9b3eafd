"""Which device a model runs on: chosen once, for training, inference and serving alike."""

from __future__ import annotations

import torch

from transferkit.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else name if name != "auto" else "cpu")
