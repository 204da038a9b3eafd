"""What `embed --out` may name, checked without PyTorch so that a wrong name answers at once."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transferkit.errors import UserError

EMBEDDING_FORMATS = (".npz", ".parquet")


def check_embeddings_path(path: Path) -> None:
    """Refuse an output the writer cannot produce before any image is embedded."""
    if path.suffix.lower() not in EMBEDDING_FORMATS:
        raise UserError(f"--out must end in {' or '.join(EMBEDDING_FORMATS)}, not '{path.name}'")
    if path.suffix.lower() == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise UserError("writing .parquet needs pyarrow (pip install pyarrow); or write .npz")
