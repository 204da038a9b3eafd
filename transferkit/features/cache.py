"""On-disk feature cache: frozen-backbone features computed once, reused across runs and recipes.

Keyed by what determines a feature: the backbone's weights (a digest of its tensors, whatever their source), the
preprocessing, the view (clean, or augmented view k with its augmentation settings) and the image file's content
(not its path or mtime). Storage is append-only segments per feature space: `<id>.npy` (float32 rows, streamed to
disk as they are computed and read back a batch at a time) and `<id>.json` (keys, shape, sha256 of the .npy), both
written atomically. A segment whose checksum does
not match is deleted and its rows recomputed, never trusted.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from transferkit.data.content import file_digest
from transferkit.errors import UserError
from transferkit.fileio import atomic_path, atomic_write, output_folder
from transferkit.progress import Reporter, print_warning


def default_cache_dir() -> Path:
    if os.environ.get("TRANSFERKIT_CACHE"):
        return Path(os.environ["TRANSFERKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transferkit"


def cache_root(enabled: bool, folder: str | Path | None) -> Path | None:
    """Where features are cached: the given folder, else the default one; None when caching is off, or when the
    folder cannot be written (said once; features are then computed afresh)."""
    if not enabled:
        return None
    root = Path(folder) if folder else default_cache_dir()
    return root if writable_cache(root) else None


@functools.cache
def writable_cache(root: Path) -> bool:
    try:
        output_folder(root)
    except UserError as exc:
        print_warning("warning:", f"feature cache: {exc}; features are computed without a cache")
        return False
    return True


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]


def module_digest(module: torch.nn.Module) -> str:
    """A digest of every tensor of the module: the same weights give the same key wherever they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


class FeatureTable(Protocol):
    """Feature rows, read a batch at a time: what stage 1 trains on."""

    def __len__(self) -> int: ...

    def take(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), D) float32 rows, in the order asked."""
        ...


class ArrayTable:
    """Rows held in memory (the cache is off)."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: np.ndarray) -> np.ndarray:
        return self.rows[indices]


class ColumnTable:
    """Some columns of another table's rows: features of a depth set chosen among those computed."""

    def __init__(self, table: FeatureTable, columns: np.ndarray) -> None:
        self.table, self.columns = table, columns

    def __len__(self) -> int:
        return len(self.table)

    def take(self, indices: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.table.take(indices)[:, self.columns])


class StoredTable:
    """Rows that stay in their segment files and are read on demand with pread, so a batch costs its own bytes.

    Not a memory map: every page of a mapped file the loop touches counts in the process's resident set, and over
    an epoch that is the whole table; file reads leave it in the kernel's page cache, shared and reclaimable."""

    def __init__(self, folder: Path, locations: list[tuple[str, int]]) -> None:
        names = sorted({name for name, _ in locations})
        self._files = [open(folder / name, "rb") for name in names]  # noqa: SIM115 - open for the table's lifetime
        layouts = [_npy_layout(handle) for handle in self._files]
        self._starts = [start for start, _ in layouts]
        dims = {dim for _, dim in layouts}
        if len(dims) > 1:
            raise ValueError(f"feature segments of different widths in {folder}")
        self.dim = dims.pop() if dims else 0
        number = {name: i for i, name in enumerate(names)}
        self._segment = np.array([number[name] for name, _ in locations], dtype=np.int64)
        self._row = np.array([row for _, row in locations], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._row)

    def take(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        row_bytes = 4 * self.dim
        segments, rows = self._segment[indices], self._row[indices]
        order = np.lexsort((rows, segments))  # consecutive rows of one segment are read with one call
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and segments[order[end]] == segments[order[start]] \
                    and rows[order[end]] == rows[order[end - 1]] + 1:
                end += 1
            segment, first = segments[order[start]], rows[order[start]]
            offset = self._starts[segment] + row_bytes * first
            data = os.pread(self._files[segment].fileno(), row_bytes * (end - start), offset)
            out[order[start:end]] = np.frombuffer(data, dtype=np.float32).reshape(end - start, self.dim)
            start = end
        return out


def _npy_layout(handle) -> tuple[int, int]:
    """(offset of the data, row width) of a 2-D float32 .npy file."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(handle)
    if len(shape) != 2 or fortran or dtype != np.float32:
        raise ValueError(f"{handle.name} is not a 2-D float32 array")
    return handle.tell(), shape[1]


class StoredTableWriter:
    """Writes one segment a batch at a time, so nothing is held whole in memory."""

    def __init__(self, path: Path, rows: int) -> None:
        self.path, self.rows, self.written, self.dim = path, rows, 0, 0
        self._handle = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._digest = hashlib.sha256()

    def write(self, features: np.ndarray) -> None:
        features = np.ascontiguousarray(features, dtype=np.float32)
        if self.written == 0:
            self.dim = features.shape[1]
            self._emit(_npy_header({"descr": "<f4", "fortran_order": False, "shape": (self.rows, self.dim)}))
        self._emit(features.tobytes())
        self.written += len(features)

    def _emit(self, data: bytes) -> None:
        self._handle.write(data)
        self._digest.update(data)

    def finish(self) -> str:
        """Check every row came; the file's digest (as `file_digest` computes it)."""
        if self.written != self.rows:
            raise RuntimeError(f"feature segment got {self.written} rows for {self.rows} keys")
        self._handle.flush()
        return self._digest.hexdigest()[:32]

    def close(self) -> None:
        self._handle.close()


def _npy_header(header: dict) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


class FeatureStore:
    """The rows of one feature space, found by key; a `writer` appends a segment."""

    def __init__(self, root: Path, space: dict, reporter: Reporter) -> None:
        space_id = hashlib.sha256(json.dumps(space, sort_keys=True).encode()).hexdigest()[:24]
        self.folder = Path(root) / "features" / space_id
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "space.json").is_file():  # a record for people; its name is its content's digest
            atomic_write(self.folder / "space.json", json.dumps(space, indent=1, sort_keys=True))
        self.reporter = reporter
        self.rows: dict[str, tuple[str, int]] = {}
        for meta_path in sorted(self.folder.glob("*.json")):
            if meta_path.name != "space.json":
                self._load_segment(meta_path)

    def _load_segment(self, meta_path: Path) -> None:
        data_path = meta_path.with_suffix(".npy")
        try:
            meta = json.loads(meta_path.read_text())
            if (file_digest(data_path) != meta["sha256"] or len(meta["keys"]) != meta["shape"][0]
                    or ("keys_sha256" in meta and meta["keys_sha256"] != keys_digest(meta["keys"]))):
                # the keys name the rows; a segment from before the keys were checksummed has no digest of them
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, KeyError, TypeError):
            self.reporter.warn(f"feature cache segment {meta_path.stem} is corrupt; it will be recomputed")
            meta_path.unlink(missing_ok=True)
            data_path.unlink(missing_ok=True)
            return
        self.rows.update({key: (data_path.name, row) for row, key in enumerate(meta["keys"])})

    def table(self, keys: list[str]) -> StoredTable:
        """The rows of `keys`, all of which must be in the store."""
        return StoredTable(self.folder, [self.rows[key] for key in keys])

    @contextmanager
    def writer(self, keys: list[str]) -> Iterator[StoredTableWriter]:
        """A new segment for `keys`, filled batch by batch in their order; it becomes visible (atomically, with its
        checksum) only if every row was written, so an interrupted extraction leaves no half segment behind."""
        name = uuid.uuid4().hex
        data_path = self.folder / f"{name}.npy"
        with atomic_path(data_path) as tmp:
            segment = StoredTableWriter(tmp, len(keys))
            try:
                yield segment
                digest = segment.finish()
            finally:
                segment.close()
        meta = {"keys": keys, "shape": [len(keys), segment.dim], "sha256": digest, "keys_sha256": keys_digest(keys)}
        atomic_write(self.folder / f"{name}.json", json.dumps(meta))
        self.rows.update({key: (data_path.name, row) for row, key in enumerate(keys)})
