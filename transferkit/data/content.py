"""Image files by content: a digest of their bytes, and rows grouped by identical bytes. Used to key the feature
cache, to find copies of training images among held-out ones, and by doctor; no torch, so a predictor can check an
export's provenance without it."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from transferkit.data.members import is_shard_member, member_digest


def file_digest(path: str | Path) -> str:
    """The content digest of a file (or of a packed dataset's member: the same one its bytes have as a file)."""
    if is_shard_member(path):
        return member_digest(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def group_by_content(digests: Sequence[str]) -> list[list[int]]:
    """Rows with identical bytes together, in first-seen order: one entry per distinct image."""
    groups: dict[str, list[int]] = defaultdict(list)
    for row, digest in enumerate(digests):
        groups[digest].append(row)
    return list(groups.values())
