"""Images on disk -> normalised tensors, decoded in DataLoader workers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from transferkit.data.images import load_rgb


class ImageDataset(Dataset):
    """(image tensor, class index) for each path; index -1 where the label is unknown (prediction).

    With `seeds`, each image's random transform draws from its own seed: the same augmented view every time,
    whichever worker or batch it lands in (what lets augmented features be cached)."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int] | None, transform: Callable,
                 seeds: Sequence[int] | None = None) -> None:
        self.paths = list(paths)
        self.targets = list(targets) if targets is not None else [-1] * len(self.paths)
        self.transform = transform
        self.seeds = list(seeds) if seeds is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_rgb(self.paths[index])
        if self.seeds is None:
            return self.transform(image), self.targets[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seeds[index])
            return self.transform(image), self.targets[index]


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
