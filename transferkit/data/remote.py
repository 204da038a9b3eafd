"""Packed datasets at a URL (`https://host/shards/`, `s3://bucket/shards/`, any fsspec protocol): the few reads
the shard readers need, through fsspec, with the credentials of the user's usual environment (fsspec and its
backends read them: AWS_* variables, ~/.aws, ...).

Local folders never come here: they keep `os.pread` on inherited descriptors (`transferkit.data.members`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from transferkit.errors import UnreadableImage, UserError

EXTRA = "pip install 'transferkit[cloud]'"
T = TypeVar("T")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_READ_BLOCK = 1 << 20  # streamed shards are read forward in 1 MiB range requests


def is_url(path: str | os.PathLike[str]) -> bool:
    """A remote location (`scheme://...`, not `file://`), as opposed to a local path."""
    text = os.fspath(path)
    return bool(_URL.match(text)) and not text.startswith("file://")


def join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


def _filesystem(url: str):
    """(fsspec filesystem, path in it); a missing backend is one line naming the extra."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise UserError(f"reading data at a URL ({url}) needs fsspec: {EXTRA}") from None
    try:
        return url_to_fs(url)
    except ImportError as exc:
        raise UserError(f"reading {url} needs a backend that is not installed ({exc}): {EXTRA}") from None
    except ValueError as exc:
        raise UserError(f"cannot read {url}: {exc}") from None


def _failure(url: str, exc: BaseException) -> str:
    return f"cannot read {url}: {type(exc).__name__}: {' '.join(str(exc).split()) or 'no details'}"


def _call(url: str, action: Callable[[Any, str], T], error: type[UserError] = UserError) -> T:
    """`action(filesystem, path)`; whatever the backend raises (network, credentials, permissions: each backend has
    its own exception types) becomes one line of `error`."""
    fs, path = _filesystem(url)
    try:
        return action(fs, path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise error(_failure(url, exc)) from None


def read_text(url: str) -> str:
    """A whole (small) remote file as text, e.g. a shard folder's index.json."""
    try:
        return _call(url, lambda fs, path: fs.cat_file(path).decode())
    except FileNotFoundError as exc:
        raise UserError(_failure(url, exc)) from None


def exists(url: str) -> bool:
    try:
        return bool(_call(url, lambda fs, path: fs.exists(path)))
    except FileNotFoundError:
        return False


def size(url: str) -> int:
    """A remote file's size in bytes (FileNotFoundError when it is missing)."""
    found = _call(url, lambda fs, path: fs.size(path))
    if found is None:
        raise UserError(f"cannot read {url}: the server gives no size")
    return int(found)


def read_range(url: str, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of a remote file: one range request."""
    try:
        return _call(url, lambda fs, path: fs.cat_file(path, start=offset, end=offset + length), UnreadableImage)
    except FileNotFoundError as exc:
        raise UnreadableImage(_failure(url, exc)) from None


def open_stream(url: str) -> BinaryIO:
    """A seekable read handle on a remote file; reads forward go out as range requests of `_READ_BLOCK` bytes."""
    try:
        return _call(url, lambda fs, path: fs.open(path, "rb", block_size=_READ_BLOCK, cache_type="readahead"))
    except FileNotFoundError as exc:
        raise UserError(_failure(url, exc)) from None
