"""Images on disk -> normalised tensors, decoded in DataLoader workers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from transferkit.data.images import load_rgb


class ImageDataset(Dataset):
    """(image tensor, class index) for each path; index -1 where the label is unknown (prediction)."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int] | None, transform: Callable) -> None:
        self.paths = list(paths)
        self.targets = list(targets) if targets is not None else [-1] * len(self.paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_rgb(self.paths[index])), self.targets[index]


def make_loader(
    dataset: Dataset, batch_size: int, workers: int, shuffle: bool = False, generator: torch.Generator | None = None
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        persistent_workers=False,
        drop_last=False,
    )
