"""Where and how the arithmetic runs: device, mixed precision and gradient accumulation, decided once."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from transferkit import cpu
from transferkit.errors import UserError
from transferkit.progress import print_warning


@dataclass
class Compute:
    """AMP (fp16 + loss scaling) on CUDA by default; fp32 on CPU by default, where bf16 autocast is no faster for
    the default partial fine-tune (decision 0219) — `bf16` stays available for full fine-tunes."""

    device: torch.device
    precision: str = "auto"
    accumulate: int = 1  # optimizer step every N batches: a larger effective batch in the same memory
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        if self.precision == "auto":
            self.precision = "fp16" if self.device.type == "cuda" else "fp32"
        if self.precision == "fp16" and self.device.type != "cuda":
            raise UserError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        if self.precision == "bf16" and self.device.type == "cpu" and not cpu.has_bf16():
            print_warning("warning:", f"this CPU has no bf16 arithmetic ({cpu.isa_summary()}): bf16 is emulated and "
                          "slower than fp32 here")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.float16 if self.precision == "fp16" else torch.bfloat16)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)


@contextlib.contextmanager
def intra_op_threads(threads: int | None):
    """PyTorch's CPU threads set to `threads` inside the block (None: left as they are). A head on cached features
    works on (32, 1280) tensors: splitting such ops over threads costs more than it gains (decision 0261)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
