"""Images inside WebDataset tar shards, addressed like files: the low-level reader behind `load_rgb` and
`content.file_digest`, so every consumer of a sample path (training, evaluation, reports, Grad-CAM, the feature cache,
doctor) reads packed datasets unchanged.

A member reference is ``<absolute shard path>::<member name>``, e.g. ``/data/shards/train-00000.tar::00000123.jpg``:
the shard file, ``::``, and the name of the image's member in the tar. The shard folder's ``index.json`` (written by
`transferkit pack`) holds each member's byte offset, size and content sha256, so an image is one ``pread`` and its
content digest needs no read at all. A folder at a URL (`https://host/shards/`) is read the same way through
fsspec (`transferkit.data.remote`): one range request per image. The index is loaded once per folder per process
(again when it changes), shard files stay open for the process's lifetime (``pread`` has no shared file position,
so forked loader workers can use inherited descriptors).

Not through wids: it would parse every header of a shard on first use and download whole shards from a URL, and it
has no per-image sha256 (the feature cache's key); see decision 0250.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from transferkit.data import remote
from transferkit.errors import UnreadableImage, UserError

INDEX_NAME = "index.json"
FORMAT = "transferkit-shards"
VERSION = 1
STATE_NAME = ".pack-state.jsonl"
SEPARATOR = "::"
_REF = re.compile(r"^(.+\.tar)::([^/\\]+)$", re.DOTALL)


def member_ref(shard: str | os.PathLike[str], member: str) -> str:
    """The path-like reference of one member of a shard."""
    return f"{os.fspath(shard)}{SEPARATOR}{member}"


def is_shard_member(path: str | os.PathLike[str]) -> bool:
    """True for a member reference (``SHARD.tar::MEMBER``) rather than a plain file path."""
    return isinstance(path, str) and SEPARATOR in path and _REF.match(path) is not None


def split_ref(ref: str) -> tuple[str, str]:
    """(shard path, member name) of a member reference."""
    match = _REF.match(ref)
    if match is None:
        raise ValueError(f"not a shard member reference: {ref!r}")
    return match.group(1), match.group(2)


def is_shard_folder(path: str | os.PathLike[str]) -> bool:
    """A folder written by `transferkit pack` (it holds our index.json)."""
    if remote.is_url(path):
        return remote.exists(remote.join(os.fspath(path), INDEX_NAME))
    return os.path.isfile(os.path.join(os.fspath(path), INDEX_NAME))


def looks_packed(path: str | os.PathLike[str]) -> bool:
    """A complete pack, or an unfinished one (its state file but no index yet)."""
    if remote.is_url(path):
        return is_shard_folder(path)
    return is_shard_folder(path) or os.path.isfile(os.path.join(os.fspath(path), STATE_NAME))


@dataclass(frozen=True)
class Location:
    """Where one image's bytes lie: its shard file, byte offset and size, and the sha256 of those bytes."""

    shard: str
    offset: int
    size: int
    sha256: str


def read_index(folder: str | os.PathLike[str]) -> dict:
    """The parsed index.json of a shard folder; an unreadable or foreign file is a one-line UserError."""
    path = remote.join(os.fspath(folder), INDEX_NAME) if remote.is_url(folder) else Path(folder) / INDEX_NAME
    try:
        data = json.loads(remote.read_text(path) if isinstance(path, str) else path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot read shard index {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a transferkit shard index (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise UserError(f"{path} has shard index version {data.get('version')}; this transferkit reads {VERSION}")
    return data


def check_shards(folder: str | os.PathLike[str], index: dict) -> None:
    """Every shard the index lists exists with its recorded size, else one UserError naming the first that does
    not (missing, truncated or replaced): a damaged dataset fails when opened, not mid-epoch."""
    for shard in index["shards"]:
        path = shard_path(folder, shard["name"])
        try:
            size = remote.size(path) if isinstance(path, str) else path.stat().st_size
        except OSError as exc:
            raise UserError(f"shard {path} listed in {INDEX_NAME} is missing ({exc.strerror or exc}); "
                            "re-run `transferkit pack` on the source data to rewrite it") from None
        if size != shard["size"]:
            raise UserError(f"shard {path} is {size} bytes but {INDEX_NAME} says {shard['size']} (truncated or "
                            "replaced); re-run `transferkit pack` on the source data to rewrite it")


def shard_path(folder: str | os.PathLike[str], name: str) -> str | Path:
    """A shard of a folder: a Path, or a URL string for a folder at a URL."""
    return remote.join(os.fspath(folder), name) if remote.is_url(folder) else Path(folder) / name


class _Folder:
    """One shard folder's member locations, and the shard files opened so far in this process."""

    def __init__(self, folder: str, stamp: tuple[int, int, int]) -> None:
        self.stamp = stamp
        index = read_index(folder)
        self.locations = {
            (shard["name"], sample["member"]): (sample["offset"], sample["size"], sample["sha256"])
            for shard in index["shards"] for sample in shard["samples"]
        }
        self.files: dict[str, int] = {}

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


_FOLDERS: dict[str, _Folder] = {}
_LOCK = threading.Lock()  # decoding threads (image_problems) may open the same folder at once


def _folder(folder: str) -> _Folder:
    """The cached locations of a folder, reloaded when its index.json changed (a re-pack); a folder at a URL is
    read once per process."""
    stamp = (0, 0, 0) if remote.is_url(folder) else _local_stamp(folder)
    with _LOCK:
        cached = _FOLDERS.get(folder)
        if cached is None or cached.stamp != stamp:
            if cached is not None:
                cached.close()
            _FOLDERS[folder] = cached = _Folder(folder, stamp)
        return cached


def _local_stamp(folder: str) -> tuple[int, int, int]:
    try:
        st = os.stat(os.path.join(folder, INDEX_NAME))
    except OSError as exc:
        raise UnreadableImage(f"cannot read: no {INDEX_NAME} in {folder} ({exc.strerror})") from None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _lookup(ref: str) -> tuple[_Folder, Location]:
    shard, member = split_ref(ref)
    folder, name = os.path.split(shard)
    cached = _folder(folder)
    found = cached.locations.get((name, member))
    if found is None:
        raise UnreadableImage(f"cannot read: {member} is not in {name} according to {INDEX_NAME}")
    return cached, Location(shard, *found)


def locate(ref: str) -> Location:
    """Where a member's bytes are, from its folder's index; an unknown member is an UnreadableImage."""
    return _lookup(ref)[1]


def read_member(ref: str) -> bytes:
    """The member's bytes, by one pread at its recorded offset."""
    folder, where = _lookup(ref)
    if remote.is_url(where.shard):
        data = remote.read_range(where.shard, where.offset, where.size)
        if len(data) != where.size:
            raise UnreadableImage(f"cannot read: shard {where.shard} is truncated")
        return data
    try:
        with _LOCK:
            fd = folder.files.get(where.shard)
            if fd is None:
                fd = folder.files[where.shard] = os.open(where.shard, os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(fd, where.size, where.offset)
    except OSError as exc:
        raise UnreadableImage(f"cannot read: {exc.strerror or exc}") from None
    if len(data) != where.size:
        raise UnreadableImage(f"cannot read: shard {os.path.basename(where.shard)} is truncated")
    return data


def member_digest(ref: str) -> str:
    """`content.file_digest` of a member: the same digest its bytes have as a loose file, without reading them."""
    return locate(ref).sha256[:32]


def member_exists(ref: str) -> bool:
    """The member is in its folder's index and its shard file is there."""
    try:
        shard = locate(ref).shard
        return remote.exists(shard) if remote.is_url(shard) else os.path.isfile(shard)
    except (UnreadableImage, UserError):
        return False
