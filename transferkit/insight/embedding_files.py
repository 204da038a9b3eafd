"""What `embed --out` may name, checked without PyTorch so that a wrong name answers at once."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transferkit.errors import UserError
from transferkit.fileio import check_suffix

EMBEDDING_FORMATS = (".npz", ".parquet")


def check_embeddings_path(path: Path) -> None:
    """Refuse an output the writer cannot produce before any image is embedded."""
    check_suffix(path, EMBEDDING_FORMATS)
    if path.suffix.lower() == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise UserError("writing .parquet needs pyarrow (pip install pyarrow); or write .npz")
