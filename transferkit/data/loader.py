"""Images on disk -> normalised tensors, decoded (and cropped to their boxes) in DataLoader workers."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from transferkit.data.boxes import Box, crop_regions
from transferkit.data.images import load_image
from transferkit.data.sources import DatasetIndex, Sample
from transferkit.data.transforms import decode_size


class ImageDataset(Dataset):
    """(image tensor, target) for each path; target -1 where the label is unknown (prediction). A target is a class
    index, or a multi-hot row when `targets` is a (N, labels) tensor. `crops` are per-image regions to cut out.

    With `seeds`, each image's random transform draws from its own seed: the same augmented view every time,
    whichever worker or batch it lands in (what lets augmented features be cached, and a resumed epoch replay)."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int] | torch.Tensor | None, transform: Callable,
                 seeds: Sequence[int] | None = None, crops: Sequence[Box | None] | None = None) -> None:
        self.paths = list(paths)
        self.targets = list(targets) if targets is not None else [-1] * len(self.paths)
        self.transform = transform
        self.seeds = list(seeds) if seeds is not None else None
        self.crops = list(crops) if crops is not None else [None] * len(self.paths)
        self.reduce_to = decode_size(transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        image = load_image(self.paths[index], self.crops[index], self.reduce_to)
        if self.seeds is None:
            return self.transform(image), self.targets[index]
        with seeded(self.seeds[index]):
            return self.transform(image), self.targets[index]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The CPU's global RNGs seeded with `seed` inside: torch's (torchvision's transforms), numpy's and Python's
    (timm's RandAugment and Mixup). Outside, torch's generator is as it was; numpy's and Python's go on from a seed
    drawn from their own stream first, never from `seed`: copying their states cost 90 µs an image. Seeding the
    default generator alone is 40x cheaper than torch.random.fork_rng + torch.manual_seed (every device)."""
    generator = torch.default_generator
    state, numpy_next, python_next = generator.get_state(), np.random.randint(2**32), random.getrandbits(64)
    generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)
        np.random.seed(numpy_next)
        random.seed(python_next)


@dataclass(frozen=True)
class Labelled:
    """One split, ready to train or validate on: image paths, their targets and the regions to crop (None: none)."""

    paths: list[str]
    targets: torch.Tensor  # (N,) class indices, or (N, labels) multi-hot floats for a multi-label index
    crops: list[Box | None] | None = None

    def dataset(self, transform: Callable) -> ImageDataset:
        return ImageDataset(self.paths, self.targets, transform, crops=self.crops)


def targets_of(samples: Sequence[Sample], labels_of: Callable[[Sample], tuple[str, ...]], classes: list[str],
               multi_hot: bool) -> torch.Tensor:
    """Class indices into `classes`, or (multi-label) multi-hot rows over them."""
    if not multi_hot:
        return torch.tensor([classes.index(s.label) for s in samples], dtype=torch.long)
    hot = torch.zeros(len(samples), len(classes))
    for row, sample in enumerate(samples):
        hot[row, [classes.index(label) for label in labels_of(sample)]] = 1.0
    return hot


def labelled_split(index: DatasetIndex, split: str, box_margin: float) -> Labelled:
    samples = index.split(split)
    return Labelled([s.path for s in samples], targets_of(samples, index.labels_of, index.classes, index.multilabel),
                    crop_regions([s.box for s in samples], box_margin))


def make_loader(dataset: Dataset, batch_size: int, workers: int, order: Sequence[int] | None = None) -> DataLoader:
    """Batches in dataset order, or in `order` (indices: a shuffled epoch, or the rest of one when resuming).
    The loader's own generator seeds its workers, so iterating it never draws from the global RNG that dropout
    uses: training is identical whether validation ran in between or the run was resumed."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,
        num_workers=workers,
        generator=torch.Generator(),
        persistent_workers=False,
        drop_last=False,
    )
