"""Several processes, one run: data-parallel training (DDP) in processes started by HF `accelerate launch`.

What each part does across processes ("ranks"), and why:
- frozen-backbone features: each rank extracts every world-th image; with the cache on, the ranks then read each
  other's rows from it (content-keyed shards), otherwise the rows are gathered over the process group;
- stage 1 (head on cached features): replicated — every rank trains the same head on the same global batches
  (seeded), which costs less than the gradient all-reduce would;
- stage 2 (fine-tune): DistributedDataParallel; global batch k (batch_size x world images of the epoch's seeded
  order) is cut into one contiguous piece per rank, so N processes compute exactly the gradients one process
  would with an N-times larger batch; validation images are split across ranks and the logits gathered, so the
  metrics (and so early stopping) are the same everywhere;
- only rank 0 writes the run folder, logs and progress bars.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from transferkit.errors import UserError

if TYPE_CHECKING:
    from transferkit.training.state import Running


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    backend: str = ""
    device: torch.device | None = None  # the device accelerate assigned to this rank (None: not distributed)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def mine(self, items: Sequence) -> list:
        """Every world-th item, from this rank's index: its share of an evaluation or extraction."""
        return list(items[self.rank::self.world])

    def piece(self, chunk: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous piece of a global batch whose length is a multiple of `world`."""
        size = len(chunk) // self.world
        return chunk[self.rank * size:(self.rank + 1) * size]

    def pad(self, order: torch.Tensor) -> torch.Tensor:
        """The order, lengthened by repeating its start to a multiple of `world` (as DistributedSampler does), so
        every rank steps the same number of times — a rank with no batch would leave the others waiting."""
        return torch.cat([order, order[: -len(order) % self.world]]) if self.distributed else order

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Rows computed by each rank for its `mine()` share, back in their original order, on every rank."""
        if not self.distributed:
            return local
        parts: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(parts, local.cpu())
        out = torch.empty((sum(len(p) for p in parts), *local.shape[1:]), dtype=local.dtype)
        for rank, part in enumerate(parts):
            out[rank::self.world] = part
        return out

    def total(self, running: Running) -> Running:
        """An epoch's sums (loop.Running) over all ranks, each of which saw only its pieces of the batches."""
        if not self.distributed:
            return running
        sums = torch.tensor([running.loss_sum, running.correct, float(running.seen)], dtype=torch.float64)
        torch.distributed.all_reduce(sums)
        return dataclasses.replace(running, loss_sum=float(sums[0]), correct=float(sums[1]), seen=int(sums[2]))

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as DDP sees it (gradients averaged across ranks in backward); itself when alone."""
        if not self.distributed:
            return model
        device_ids = [self.device] if self.device is not None and self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def current_ranks(device: str) -> Ranks:
    """The ranks of this process: alone unless started by `accelerate launch` (or torchrun) with several."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    from accelerate import PartialState  # sets up the process group from the launcher's environment

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    device_of_rank = torch.device("cpu") if state.device.type == "cpu" else state.device
    return Ranks(state.process_index, state.num_processes, str(state.backend), device_of_rank)


def sync_batchnorm(model: nn.Module, ranks: Ranks) -> nn.Module:
    """Batch-norm layers whose statistics are computed over the global batch (timm's conversion also covers its
    fused BatchNorm+activation layers). PyTorch's SyncBatchNorm has kernels for GPUs only."""
    if ranks.device is None or ranks.device.type != "cuda":
        raise UserError("sync_bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernel)")
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)
