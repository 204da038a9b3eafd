"""The URL list: `url,label[,split]` rows read from a CSV, and each row's folder under `--out`, made safe.

A label comes from a stranger's spreadsheet and becomes a folder name, so it is cleaned until it cannot name
anything but one folder inside the output: no separators, no `..`, no hidden names, no control characters."""

from __future__ import annotations

import csv
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from transferkit.data.sources import SPLIT_ALIASES
from transferkit.errors import UserError

MAX_NAME_BYTES = 100
"""Longest folder name made from a label, in UTF-8 bytes (file systems allow 255; leave room for humans)."""

_SEPARATORS = re.compile(r"[/\\]+")
_RESERVED = re.compile(r'[<>:"|?*]')  # not allowed in Windows file names: the dataset may be copied there


class RowProblem(Exception):
    """A row that cannot be fetched as written; the message is the reason in the report."""


@dataclass(frozen=True)
class Row:
    line: int  # line number in the CSV, for the report
    url: str
    label: str
    split: str  # the raw cell; "" when empty or when the CSV has no split column


def read_rows(csv_path: Path) -> tuple[list[Row], bool]:
    """The CSV's rows (stripped cells) and whether it has a split column; a missing, unreadable, header-less or
    empty CSV is a UserError."""
    if not csv_path.is_file():
        raise UserError(f"CSV not found: {csv_path}" if not csv_path.exists() else f"not a CSV file: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [(name or "").strip().lower() for name in reader.fieldnames or []]
            _check_columns(csv_path, columns)
            reader.fieldnames = columns
            rows = [Row(reader.line_num, *((record.get(c) or "").strip() for c in ("url", "label", "split")))
                    for record in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read CSV {csv_path}: {' '.join(str(exc).split())}") from exc
    if not rows:
        raise UserError(f"CSV {csv_path} has no rows below its header")
    return rows, "split" in columns


def _check_columns(csv_path: Path, columns: list[str]) -> None:
    if not columns:
        raise UserError(f"CSV {csv_path} is empty; expected a header 'url,label[,split]' and one row per image")
    if not {"url", "label"} <= set(columns):
        found = ", ".join(c for c in columns if c) or "none"
        raise UserError(f"CSV {csv_path} must have 'url' and 'label' columns in its header; found: {found}")


def row_folder(row: Row, with_splits: bool) -> Path:
    """The row's folder relative to `--out`: `<split>/<label>` or `<label>`. Raises RowProblem."""
    if not row.url or not row.label:
        raise RowProblem("row without url or label")
    if not _is_http_url(row.url):
        raise RowProblem("not an http(s) URL")
    label = safe_name(row.label)
    if not label:
        raise RowProblem(f"label {row.label!r} has no usable characters for a folder name")
    return Path(split_folder(row.split), label) if with_splits else Path(label)


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. a malformed IPv6 host
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def split_folder(split: str) -> str:
    """The canonical split name (train, val, test); an empty cell means train, as `transferkit train` then
    carves its validation images out of train/ unless a val/ folder exists."""
    if not split:
        return "train"
    if split.lower() not in SPLIT_ALIASES:
        raise RowProblem(f"unknown split {split!r} (use train, val, valid, validation or test)")
    return SPLIT_ALIASES[split.lower()]


def safe_name(text: str) -> str:
    """One folder name from arbitrary text: separators join parts with `_`, parts lose control characters,
    characters Windows reserves and leading dots (so no `..` and no hidden folders); "" when nothing is left."""
    parts = (_clean_part(part) for part in _SEPARATORS.split(text))
    name = "_".join(part for part in parts if part)
    truncated = name.encode()[:MAX_NAME_BYTES].decode(errors="ignore")  # never half a character
    return truncated.rstrip(". ")  # Windows drops trailing dots and spaces: two labels would share a folder


def _clean_part(part: str) -> str:
    # Category C: control, format (e.g. right-to-left override, which can disguise a name), unassigned.
    visible = "".join(ch for ch in unicodedata.normalize("NFC", part) if not unicodedata.category(ch).startswith("C"))
    return _RESERVED.sub("_", visible).strip().lstrip(".").strip()
