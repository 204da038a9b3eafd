"""On-disk feature cache: frozen-backbone features computed once, reused across runs and recipes.

Keyed by what determines a feature: the backbone's weights (a digest of its tensors, whatever their source), the
preprocessing, the view (clean, or augmented view k with its augmentation settings) and the image file's content
(not its path or mtime). Storage is append-only shards per feature space: `<id>.npy` (float32 rows, memory-mapped
on read) and `<id>.json` (keys, shape, sha256 of the .npy), both written atomically. A shard whose checksum does
not match is deleted and its rows recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from transferkit.progress import Reporter


def default_cache_dir() -> Path:
    if os.environ.get("TRANSFERKIT_CACHE"):
        return Path(os.environ["TRANSFERKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transferkit"


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def module_digest(module: torch.nn.Module) -> str:
    """A digest of every tensor of the module: the same weights give the same key wherever they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class FeatureStore:
    """The rows of one feature space, found by key; `put` appends a shard."""

    def __init__(self, root: Path, space: dict, reporter: Reporter) -> None:
        space_id = hashlib.sha256(json.dumps(space, sort_keys=True).encode()).hexdigest()[:24]
        self.folder = Path(root) / "features" / space_id
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "space.json").write_text(json.dumps(space, indent=1, sort_keys=True))
        self.reporter = reporter
        self.rows: dict[str, tuple[str, int]] = {}
        for meta_path in sorted(self.folder.glob("*.json")):
            if meta_path.name != "space.json":
                self._load_shard(meta_path)

    def _load_shard(self, meta_path: Path) -> None:
        data_path = meta_path.with_suffix(".npy")
        try:
            meta = json.loads(meta_path.read_text())
            if file_digest(data_path) != meta["sha256"] or len(meta["keys"]) != meta["shape"][0]:
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, KeyError, TypeError):
            self.reporter.warn(f"feature cache shard {meta_path.stem} is corrupt; it will be recomputed")
            meta_path.unlink(missing_ok=True)
            data_path.unlink(missing_ok=True)
            return
        self.rows.update({key: (data_path.name, row) for row, key in enumerate(meta["keys"])})

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        """The cached rows among `keys` (missing keys are absent from the result)."""
        by_shard: dict[str, list[tuple[str, int]]] = {}
        for key in keys:
            if key in self.rows:
                shard, row = self.rows[key]
                by_shard.setdefault(shard, []).append((key, row))
        found = {}
        for shard, wanted in by_shard.items():
            data = np.load(self.folder / shard, mmap_mode="r")
            found.update({key: np.array(data[row]) for key, row in wanted})
        return found

    def put(self, keys: list[str], features: np.ndarray) -> None:
        name = uuid.uuid4().hex
        data_path = self.folder / f"{name}.npy"
        _write_atomic(data_path, lambda handle: np.save(handle, np.ascontiguousarray(features, dtype=np.float32)))
        meta = {"keys": keys, "shape": list(features.shape), "sha256": file_digest(data_path)}
        _write_atomic(self.folder / f"{name}.json", lambda handle: handle.write(json.dumps(meta).encode()))
        self.rows.update({key: (data_path.name, row) for row, key in enumerate(keys)})
