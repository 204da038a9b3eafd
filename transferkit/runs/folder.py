"""What a run folder must hold, checked without importing PyTorch, so a command answers a wrong path at once."""

from __future__ import annotations

import json
from pathlib import Path

from transferkit.errors import UserError

RETRAIN = "train the run again, or restore the file from a copy"


def require_run_dir(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"no such run folder: {path}")


def require_model_files(path: Path) -> dict:
    """Both files of a finished run, and its meta.json, which must read as a JSON object."""
    if not (path / "meta.json").is_file() or not (path / "model.safetensors").is_file():
        raise UserError(f"not a complete run folder (no meta.json/model.safetensors): {path}")
    return read_meta(path)


def read_meta(folder: Path) -> dict:
    """A run folder's meta.json; one line naming the file when it is damaged (cut short, emptied, not an object)."""
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path} is damaged ({type(exc).__name__}: {exc}): {RETRAIN}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is damaged (not a JSON object): {RETRAIN}")
    return meta


def check_run_folder(path: Path) -> None:
    """A finished run folder, or an ensemble whose members all are finished; one line otherwise."""
    from transferkit.prediction import ensemble_members  # numpy and image decoding: not for every command's --help

    require_run_dir(path)
    members = ensemble_members(path)
    for folder in [member for member, _ in members] if members is not None else [path]:
        require_model_files(folder)
