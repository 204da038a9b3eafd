"""What a fetch keeps: valid images under content-hash names, never outside `--out`, and the per-URL state
that lets a re-run skip what an earlier run settled."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from transferkit.data.images import IMAGE_EXTENSIONS, decode_rgb, register_heif
from transferkit.errors import UnreadableImage, UserError
from transferkit.fetch.download import FetchFailure
from transferkit.fileio import atomic_write

STATE_NAME = ".fetch_state.json"  # hidden: dataset readers skip it
STATE_VERSION = 1
_STATUSES = ("stored", "duplicate", "failed")


def _extension_by_format() -> dict[str, str]:
    """Pillow format -> the suffix to store it under: one the dataset readers accept, the format's own name
    when that is one (.jpeg, .png, .tiff), else the shortest."""
    register_heif()  # a downloaded HEIC is stored as .heic like any other photo
    candidates: dict[str, list[str]] = defaultdict(list)
    for extension, image_format in Image.registered_extensions().items():
        if extension in IMAGE_EXTENSIONS:
            candidates[image_format].append(extension)
    return {fmt: min(exts, key=lambda e: (e != f".{fmt.lower()}", len(e), e)) for fmt, exts in candidates.items()}


EXTENSION_BY_FORMAT = _extension_by_format()


def content_digest(data: bytes) -> str:
    """A stored image's name: the digest `data.content.file_digest` gives for a file holding these bytes."""
    return hashlib.sha256(data).hexdigest()[:32]


def image_extension(data: bytes) -> str:
    """The suffix of the body's real format (never the URL's); FetchFailure with `decode_rgb`'s reason when
    the body is not a usable image (HTML, truncated, a decompression bomb)."""
    try:
        decode_rgb(data)  # the one validation every dataset image passes: the whole image is decoded
        with Image.open(io.BytesIO(data), formats=list(EXTENSION_BY_FORMAT)) as image:
            return EXTENSION_BY_FORMAT[image.format]
    except UnreadableImage as exc:
        raise FetchFailure(str(exc), permanent=True) from exc


def write_inside(out: Path, relative: Path, data: bytes) -> None:
    """Write `out/relative` atomically, refused if the resolved path leaves `out` (a symlinked folder, say)."""
    target = out / relative
    if not target.resolve().is_relative_to(out.resolve()):
        raise FetchFailure(f"refused: {relative.as_posix()} resolves outside --out", permanent=True)
    try:
        atomic_write(target, data)
    except UserError as exc:  # this file could not be written (a full disk, say): reported, the rest go on
        raise FetchFailure(str(exc), permanent=False) from None


class FetchState:
    """URL -> outcome of earlier runs (`{"status": "stored"|"duplicate", "path", "digest"}` or
    `{"status": "failed", "reason", "permanent"}`), saved atomically as OUT/.fetch_state.json."""

    def __init__(self, out: Path, entries: dict[str, dict]) -> None:
        self.out, self.entries = out, entries

    @classmethod
    def load(cls, out: Path, warn: Callable[[str], None]) -> FetchState:
        path = out / STATE_NAME
        if not path.exists():
            return cls(out, {})
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data["version"] != STATE_VERSION:
                raise ValueError("another version")
            entries = {url: e for url, e in data["urls"].items() if _well_formed(e)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            warn(f"{path} is unreadable; every URL will be fetched again")
            return cls(out, {})
        return cls(out, entries)

    def save(self) -> None:
        atomic_write(self.out / STATE_NAME, json.dumps({"version": STATE_VERSION, "urls": self.entries}))

    def settled(self, url: str, retry_failed: bool) -> dict | None:
        """The earlier outcome that makes fetching `url` again pointless: its image is still on disk, or it failed
        for good (and `--retry-failed` is off). Transient failures are always tried again."""
        entry = self.entries.get(url)
        if entry is None:
            return None
        if entry["status"] == "failed":
            return entry if entry["permanent"] and not retry_failed else None
        return entry if (self.out / entry["path"]).is_file() else None

    def stored_digests(self) -> dict[str, str]:
        """digest -> path of the images earlier runs stored and that are still there: duplicates of them are
        not stored again."""
        return {e["digest"]: e["path"] for e in self.entries.values()
                if e["status"] == "stored" and (self.out / e["path"]).is_file()}


def _well_formed(entry: object) -> bool:
    """An entry this version can act on (a hand-edited or foreign one is dropped: its URL is fetched again)."""
    if not isinstance(entry, dict) or entry.get("status") not in _STATUSES:
        return False
    if entry["status"] == "failed":
        return isinstance(entry.get("reason"), str) and isinstance(entry.get("permanent"), bool)
    path = entry.get("path")
    return isinstance(path, str) and isinstance(entry.get("digest"), str) and not os.path.isabs(path)
