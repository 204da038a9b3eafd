"""`transferkit pack`: a dataset into WebDataset tar shards that `train`, `evaluate` and `predict` read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from transferkit.cli.main import app
from transferkit.cli.output import JSON, QUIET, print_json
from transferkit.errors import UserError
from transferkit.progress import Reporter, console

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 10**3, "m": 10**6, "g": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`100MB`, `512KB`, `1.5GB`, `64MiB`, `4096` (bytes) -> bytes; decimal units (MB = 10**6), binary with `iB`."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise UserError(f"bad --shard-size '{text}': expected a number of bytes with an optional unit, e.g. 100MB, "
                        "512KB, 1GB, 64MiB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UserError(f"bad --shard-size '{text}': must be more than 0 bytes")
    return size


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def print_summary(summary: dict) -> None:
    images = summary["images"]
    per_split = ", ".join(f"{split} {n}" for split, n in images.items() if n or split != "test")
    console.print(f"packed {sum(images.values())} images ({per_split}) of {len(summary['classes'])} classes into "
                  f"{summary['shards']} shards, {_megabytes(summary['bytes'])}, in {summary['out']}")
    reused = f", {len(summary['reused'])} kept from an earlier run" if summary["reused"] else ""
    skipped = len(summary["skipped"])
    console.print(f"{len(summary['written'])} shards written{reused}; {skipped} file{'s' * (skipped != 1)} skipped"
                  + (" (listed in index.json)" if skipped else ""))


@app.command()
def pack(
    data: Annotated[Path, typer.Argument(help="Dataset: class folders, train/val/test folders or a CSV.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the shards and their index.json.")],
    shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 100MB, 512KB, 1GB.")] = "100MB",
    val_split: Annotated[float, typer.Option(help="Validation fraction of data without split folders.")] = 0.2,
    test_split: Annotated[float, typer.Option(help="Test fraction of data without split folders.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the split and of the sample order in the shards.")] = 0,
    quiet: QUIET = False,
    json_out: JSON = False,
) -> None:
    """Write DATA as WebDataset tar shards (one split per shard) plus index.json; every image is decoded first and
    unusable files are skipped and listed. The split is frozen into the shards. Re-running resumes: finished shards
    are kept."""
    from transferkit.data.shards import pack as pack_dataset

    summary = pack_dataset(data, out, parse_size(shard_size), val_split, test_split, seed, Reporter(quiet))
    print_json(summary) if json_out else print_summary(summary)
