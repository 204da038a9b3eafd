"""Dataset CSVs read as people save them: comma-, semicolon- or tab-separated (Excel writes `;` where the decimal mark
is a comma), with the column names of Keras' `flow_from_dataframe` (filename, class) and Kaggle's sheets too."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TextIO

from transferkit.data.boxes import BOX_COLUMNS, has_box_columns
from transferkit.data.images import has_image_extension
from transferkit.errors import UserError

DELIMITERS = (",", ";", "\t")
# Each canonical column and the names it also goes by, in the order they are looked for.
COLUMN_NAMES = {
    "path": ("path", "filename", "file", "filepath", "file_path", "image", "image_path", "img", "fname"),
    "label": ("label", "class", "labels", "category", "target", "tags"),
}


def open_table(handle: TextIO, source: str) -> csv.DictReader:
    """A reader over ``handle`` whose fieldnames are stripped, lower-case and canonical (path, label, …), with the
    delimiter its header uses; a UserError naming what was found when it has no path or no label column."""
    header = handle.readline()
    handle.seek(0)
    reader = csv.DictReader(handle, delimiter=max(DELIMITERS, key=header.count))
    names = [(name or "").strip().lower() for name in reader.fieldnames or []]
    found = ", ".join(name for name in names if name) or "none"
    for canonical, aliases in COLUMN_NAMES.items():
        given = next((alias for alias in aliases if alias in names), None)
        if given is None:
            wanted = " or ".join(f"'{alias}'" for alias in aliases[:3])
            raise UserError(f"CSV {source} needs a {canonical} column ({wanted}) in its header row; found: {found}")
        names[names.index(given)] = canonical
    reader.fieldnames = names
    return reader


def row_file(folder: Path, raw_path: str) -> str:
    """A row's file: relative to the CSV's folder; a Windows path (`imgs\\cat\\1.jpg`, as a CSV written there
    holds) read with `/` where no file has the name as written."""
    full = os.path.normpath(os.path.join(folder, os.path.expanduser(raw_path)))
    if "\\" in raw_path and not os.path.exists(full):
        return os.path.normpath(os.path.join(folder, raw_path.replace("\\", "/")))
    return full


def read_rows(csv_path: Path) -> tuple[bool, list[tuple[int, dict[str, str]]]]:
    """Whether the CSV has box columns, and (line, stripped cells) per row; unreadable or header-less CSVs are
    UserErrors."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = open_table(fh, str(csv_path))
            with_boxes = has_box_columns(reader.fieldnames)
            cells = ("path", "label", "split") + (BOX_COLUMNS if with_boxes else ())
            return with_boxes, [(reader.line_num, {c: (row.get(c) or "").strip() for c in cells}) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read CSV {csv_path}: {' '.join(str(exc).split())}") from exc


def row_problem(raw_path: str, label: str, full: str, key: tuple, seen: set[tuple]) -> str | None:
    """Why a CSV row cannot be used, short of decoding its file; None when it can. One file may be listed with
    several boxes (two cars in one photo), not twice with the same one."""
    if not raw_path or not label:
        return "row without path or label"
    if key in seen:
        return "listed twice in CSV"
    if not os.path.isfile(full):
        return "file not found"
    return None if has_image_extension(full) else "not an image extension"
