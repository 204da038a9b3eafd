"""Streaming a packed dataset (`transferkit pack`) for training: shards are read front to back (local ones through
wids' memory-mapped tar index, ones at a URL by webdataset's tar reader over fsspec), never whole, with a bounded
shuffle buffer of raw bytes, and split among ranks and DataLoader workers, so memory stays flat however large the
dataset.

How an epoch is cut up. The shards holding the split's samples are permuted by (seed, epoch) (not with
``shuffle=False``), then given out in turn to the unit (rank x worker; unit = rank * workers + worker) with the fewest
samples so far. With fewer shards than units, every unit reads every shard instead and keeps the samples whose
position in the epoch's order is its unit number modulo the number of units. A unit reads its shards in order,
each in one forward pass that keeps the unit's members; its shuffle buffer (``shuffle_buffer`` samples, at most
``buffer_bytes`` bytes) yields a random one of those read so far, and images are decoded, cropped to their box and
transformed only then.

Determinism guarantees:
- The samples and the order each unit yields are a pure function of (seed, epoch, rank, world, workers, the
  Labelled's paths); nothing depends on timing, so a resumed run replays an epoch exactly (skip its first batches).
  A DataLoader interleaves its workers' batches in worker order, so a rank's batch sequence is fixed too.
- An image's random augmentation is seeded from (seed, epoch, its position, repeat), independent of the unit
  that reads it.
- Without padding (``balance=False``, the default for one rank) the units' samples partition the split: each image
  exactly once per epoch. With ``balance`` (default for several ranks) every unit yields the same number of samples,
  the largest unit's, repeating its own first samples, so every rank gets the same number of batches (DDP needs
  that); at most a shard's worth of images is seen twice.
- `set_epoch` must be called before each epoch's iteration (in the process that creates the workers: use
  ``persistent_workers=False``, as `stream_loader` does).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import struct
import tarfile  # only for the error webdataset's tar reader raises on a shard cut off mid-member
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tar_file_iterator
from wids.wids_mmtar import MMIndexedTar

from transferkit.data import remote
from transferkit.data.images import decode_image
from transferkit.data.loader import Labelled, labelled_split, seeded
from transferkit.data.members import is_shard_member, locate, split_ref
from transferkit.data.sources import DatasetIndex, scan_dataset
from transferkit.data.transforms import decode_size
from transferkit.errors import UserError

_TAR_BLOCK = 512  # a member's data starts one block after its header
_RELEASE_EVERY = 8 << 20  # bytes read before their pages are given back


def is_sharded(labelled: Labelled) -> bool:
    """True when every path of a split is a shard member: it can be streamed with `ShardStream`."""
    return bool(labelled.paths) and all(is_shard_member(path) for path in labelled.paths)


def rank_and_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """The given rank and world size, else torch.distributed's when it is initialised, else (0, 1)."""
    if rank is not None and world is not None:
        return rank, world
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardStream(IterableDataset):
    """(image tensor, target) for every sample of a split of a packed dataset, streamed shard by shard.

    `source` is a `Labelled` whose paths are shard members (targets and crops are taken from it, so they equal what
    `labelled_split` gives), or a `DatasetIndex` / shard folder, of which `split` is taken (boxes grown by
    `box_margin`). See the module docstring for the order and what is guaranteed about it."""

    def __init__(self, source: Labelled | DatasetIndex | str | os.PathLike[str], transform: Callable,
                 split: str = "train", *, box_margin: float = 0.0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 buffer_bytes: int = 256 << 20, seed: int = 0, rank: int | None = None, world: int | None = None,
                 balance: bool | None = None) -> None:
        if not isinstance(source, Labelled):
            index = source if isinstance(source, DatasetIndex) else scan_dataset(Path(source))
            source = labelled_split(index, split, box_margin)
        if not is_sharded(source):
            raise UserError("ShardStream needs a packed dataset (`transferkit pack`): its paths are not shard members")
        self.transform, self.shuffle, self.seed, self.epoch = transform, shuffle, seed, 0
        self.reduce_to = decode_size(transform)
        self.shuffle_buffer, self.buffer_bytes = max(1, shuffle_buffer), buffer_bytes
        self.rank, self.world, self.balance, self.workers = rank, world, balance, 1
        self.targets, self.crops = source.targets, source.crops
        locations = [locate(path) for path in source.paths]
        self.shard_paths = sorted({loc.shard for loc in locations})
        number = {path: i for i, path in enumerate(self.shard_paths)}
        self.shard_of = np.array([number[loc.shard] for loc in locations], dtype=np.int32)
        self.offsets = np.array([loc.offset for loc in locations], dtype=np.int64)
        self.names = [split_ref(path)[1] for path in source.paths]
        order = np.lexsort((self.offsets, self.shard_of))  # by shard, then by offset: each shard front to back
        self.members = np.split(order, np.flatnonzero(np.diff(self.shard_of[order])) + 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Samples this rank yields in an epoch (all its workers together; `workers` is set by `stream_loader`)."""
        rank, world = rank_and_world(self.rank, self.world)
        return sum(len(self.unit_order(rank, world, w, self.workers)) for w in range(self.workers))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world = rank_and_world(self.rank, self.world)
        return self.iterate(rank, world, worker, workers)

    def iterate(self, rank: int = 0, world: int = 1, worker: int = 0, workers: int = 1
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """What unit (rank, worker) yields this epoch: `__iter__` in a DataLoader worker, callable directly."""
        order, own = self._unit(rank, world, worker, workers)
        raw = self._read(order, max(own, 1))
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{self.epoch}/{rank}/{world}/{worker}/{workers}")
            raw = _shuffled(raw, self.shuffle_buffer, self.buffer_bytes, rng)
        for position, repeat, data in raw:
            yield self._sample(position, repeat, data)

    def unit_order(self, rank: int, world: int, worker: int, workers: int) -> list[int]:
        """Positions (into the Labelled) unit (rank, worker) reads this epoch, in read order (before shuffling)."""
        return self._unit(rank, world, worker, workers)[0]

    def _unit(self, rank: int, world: int, worker: int, workers: int) -> tuple[list[int], int]:
        """The unit's read order, padded when balancing, and how many of its entries are its own samples."""
        if not (0 <= rank < world and 0 <= worker < workers):
            raise ValueError(f"rank {rank} of {world}, worker {worker} of {workers}: out of range")
        units = self._units(world * workers)
        own = units[rank * workers + worker]
        balance = self.balance if self.balance is not None else world > 1
        target = max(len(u) for u in units) if balance else len(own)
        source = own or [p for u in units for p in u]  # a unit without samples pads from everyone's
        return own + [source[i % len(source)] for i in range(target - len(own))] if source else [], len(own)

    def _units(self, count: int) -> list[list[int]]:
        """Every unit's positions in read order for this epoch (see the module docstring)."""
        shards = list(range(len(self.members)))
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(shards)
        if len(shards) < count:
            flat = [int(p) for s in shards for p in self.members[s]]
            return [flat[u::count] for u in range(count)]
        units: list[list[int]] = [[] for _ in range(count)]
        for s in shards:
            unit = min(range(count), key=lambda u: (len(units[u]), u))
            units[unit] += self.members[s].tolist()
        return units

    def _read(self, order: list[int], own: int) -> Iterator[tuple[int, int, bytes]]:
        """(position, repeat, raw bytes) in `order`: each stretch of it that lies forward in one shard is one pass
        over that shard, which skips the members not asked for."""
        done = 0
        for shard, stretch in _stretches(order, self.shard_of, self.offsets):
            wanted = {self.names[p]: p for p in stretch}
            for position, data in self._members(shard, wanted):
                yield position, done // own, data
                done += 1

    def _members(self, shard: int, wanted: dict[str, int]) -> Iterator[tuple[int, bytes]]:
        """(position, image bytes) of the `wanted` members (name -> position, in shard order) of a shard."""
        path, found = self.shard_paths[shard], 0
        read = _streamed_members if remote.is_url(path) else _mapped_members
        for name, data in read(path, wanted):
            yield wanted[name], data
            found += 1
            if found == len(wanted):
                break  # the rest of the shard is not needed (e.g. a padded unit's last stretch)
        if found < len(wanted):
            raise _truncated(path)

    def _sample(self, position: int, repeat: int, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode_image(data, self.crops[position] if self.crops else None, self.reduce_to)
        with seeded(hash((self.seed, self.epoch, position, repeat)) & 0x7FFF_FFFF_FFFF_FFFF):
            return self.transform(image), self.targets[position]


def _truncated(path: str) -> UserError:
    return UserError(f"shard {path} is truncated: re-run `transferkit pack`")


def _streamed_members(url: str, wanted: dict[str, int]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the wanted members of a shard at a URL, read front to back by webdataset's tar reader."""
    with remote.open_stream(url) as handle, contextlib.suppress(tarfile.ReadError):  # cut inside a member: the
        # caller sees members missing. One image member per sample is selected, so grouping by key adds nothing.
        for member in tar_file_iterator(handle, select_files=wanted.__contains__):
            yield member["fname"], member["data"]


def _mapped_members(path: str, wanted: dict[str, int]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the wanted members of a local shard through wids' memory-mapped tar index, whose header
    parsing costs a fifth of webdataset's. Pages are released as the pass moves on: no whole shard stays mapped."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed with the mapping
    except OSError as exc:
        raise UserError(f"cannot read shard {path}: {exc.strerror or exc}") from None
    try:
        shard = MMIndexedTar(handle, verbose=False)
    except (ValueError, struct.error):  # an empty file cannot be mapped; a cut header cannot be unpacked
        handle.close()
        raise _truncated(path) from None
    pages, sizes = shard.mmapped_file, {name: size for name, _, size in shard.by_index}
    pages.madvise(mmap.MADV_DONTNEED)  # building the index touched every header
    released = 0
    try:
        for name in wanted:
            if name not in shard.by_name:
                return
            start = shard.by_name[name] + _TAR_BLOCK
            if start + sizes[name] > len(pages):
                raise _truncated(path)
            yield name, pages[start:start + sizes[name]]
            if start - released >= _RELEASE_EVERY:
                done = start - start % mmap.PAGESIZE
                pages.madvise(mmap.MADV_DONTNEED, released, done - released)
                released = done
    finally:
        shard.close()


def _stretches(order: list[int], shard_of: np.ndarray, offsets: np.ndarray) -> Iterator[tuple[int, list[int]]]:
    """`order` cut wherever it changes shard or goes back within one: (shard, positions), each read in one forward
    pass (a unit's own shards are read in order, then a padded unit's repeats start again from its first)."""
    stretch: list[int] = []
    for position in order:
        last = stretch[-1] if stretch else None
        if last is not None and (shard_of[position] != shard_of[last] or offsets[position] <= offsets[last]):
            yield int(shard_of[last]), stretch
            stretch = []
        stretch.append(position)
    if stretch:
        yield int(shard_of[stretch[-1]]), stretch


def _shuffled(items: Iterator[tuple[int, int, bytes]], size: int, max_bytes: int, rng: random.Random
              ) -> Iterator[tuple[int, int, bytes]]:
    """A bounded shuffle: once `size` items (or `max_bytes` bytes) are held, each new one takes the place of a
    random held one, which is yielded; the rest come out shuffled at the end."""
    buffer: list[tuple[int, int, bytes]] = []
    held = 0
    for item in items:
        buffer.append(item)
        held += len(item[2])
        if len(buffer) >= size or held >= max_bytes:
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            out = buffer.pop()
            held -= len(out[2])
            yield out
    rng.shuffle(buffer)
    yield from buffer


def stream_loader(source: Labelled | DatasetIndex | str | os.PathLike[str], split: str, transform: Callable,
                  batch_size: int, workers: int, *, seed: int = 0, epoch: int = 0, rank: int | None = None,
                  world: int | None = None, shuffle: bool = True, shuffle_buffer: int = 1000,
                  box_margin: float = 0.0, balance: bool | None = None) -> DataLoader:
    """A DataLoader over one epoch of a `ShardStream` (`split` is used when `source` is not a Labelled). Make one
    per epoch (or call `loader.dataset.set_epoch(e)` before iterating it again)."""
    stream = ShardStream(source, transform, split, box_margin=box_margin, shuffle=shuffle,
                         shuffle_buffer=shuffle_buffer, seed=seed, rank=rank, world=world, balance=balance)
    stream.set_epoch(epoch)
    stream.workers = max(1, workers)
    # its own generator: starting an epoch must not draw from the global RNG that dropout uses (a resumed epoch's
    # loader starts mid-way through the original's random stream)
    return DataLoader(stream, batch_size=batch_size, num_workers=workers, persistent_workers=False, drop_last=False,
                      generator=torch.Generator())
