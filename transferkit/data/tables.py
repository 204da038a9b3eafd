"""Dataset CSVs as people save them: comma-, semicolon- or tab-separated (Excel writes `;` where the decimal mark
is a comma), with the column names of Keras' `flow_from_dataframe` (filename, class) and Kaggle's sheets too."""

from __future__ import annotations

import csv
from typing import TextIO

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
