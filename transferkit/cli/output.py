"""Shared by the commands: JSON on stdout for scripts, tables for people, skips on stderr, common options."""

from __future__ import annotations

import atexit
import contextlib
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from transferkit.errors import UserError
from transferkit.fileio import check_out_free
from transferkit.progress import console, print_warning
from transferkit.recipes import RECIPES

if TYPE_CHECKING:  # the CLI's help must not load image decoding
    from transferkit.data.sources import Skipped

JSON = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
QUIET = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
WORKERS = Annotated[int | None, typer.Option(help="Image decoding worker processes.")]
CACHE_DIR = Annotated[str | None, typer.Option(help="Feature cache folder ($TRANSFERKIT_CACHE).")]
NO_CACHE = Annotated[bool, typer.Option("--no-cache", help="Compute features afresh; use no cache.")]
RECIPE = Annotated[str | None, typer.Option(help=f"{', '.join(RECIPES)}.")]
CONFIG = Annotated[str | None, typer.Option(help="YAML file of configuration keys.")]
SETTINGS = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", help="Any configuration key, repeatable (`transferkit config` lists them).")]
IMAGE_SIZE = Annotated[int | None, typer.Option(help="Input size (default: the backbone's).")]
POOL = Annotated[str | None, typer.Option(help="How a CNN's feature maps are pooled: auto (max), max or avg.")]
BATCH_SIZE = Annotated[int | None, typer.Option(help="Images per step.")]
VAL_SPLIT = Annotated[float | None, typer.Option(help="Validation fraction when the data has no val split.")]
TEST_SPLIT = Annotated[float | None, typer.Option(help="Test fraction when the data has no test split.")]
DEVICE = Annotated[str | None, typer.Option(help="auto (CUDA when available), cpu or cuda.")]
DROP_LEAKS = Annotated[bool, typer.Option(
    "--drop-leaks", help="Score held-out images without the byte-identical copies of training images.")]
OVERWRITE = Annotated[bool, typer.Option(help="Replace an existing run in --out.")]
ENGINE = Annotated[str, typer.Option(help="auto (the int8 export, else the fp32 one, else torch), int8, onnx, torch.")]


def check_paths(data: str, out: Path | None = None, overwrite: bool = False) -> None:
    """A missing DATA or a finished run in --out answers at once, before PyTorch (seconds to import) is loaded."""
    from transferkit.data.sources import check_data_path

    check_data_path(data)
    if out is not None:
        check_out_free(out, overwrite)


def default_run_folder(data: str, suffix: str = "") -> Path:
    """runs/NAME for data called NAME (a folder, a CSV's stem, a URL's last part), else runs/NAME-2, -3, …: a
    command run twice keeps both runs, as ultralytics' runs/train, train2 do. The folder is created here, so two
    commands started together never share one; it is removed at exit if the command wrote nothing in it."""
    last = data.rstrip("/").rsplit("/", 1)[-1] if "://" in data else Path(data).resolve().name
    name = re.sub(r"[^\w.-]+", "_", Path(last).stem).strip("_.") or "run"
    base = Path("runs") / f"{name}{suffix}"
    folder, number = base, 2
    while True:
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            folder, number = base.with_name(f"{base.name}-{number}"), number + 1
            continue
        except OSError as exc:
            raise UserError(f"cannot create {folder}: {exc.strerror or exc}; pass --out") from None
        atexit.register(remove_if_empty, folder)
        return folder


def remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (the run was written) or already gone
        folder.rmdir()


def announced_run_folder(data: str, suffix: str, quiet: bool) -> Path:
    """default_run_folder, said on the console (unless quiet) before the run starts writing there."""
    folder = default_run_folder(data, suffix)
    if not quiet:
        console.print(f"run folder: {folder} (--out chooses another)")
    return folder


def print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def report_skipped(skipped: list[Skipped]) -> None:
    for item in skipped:
        print_warning("skipped", f"{item.path}: {item.reason}")


def print_predictions(results: list[dict]) -> None:
    for result in results:
        others = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in result["top"][1:])
        print(f"{predicted_image(result)}: {result['label']} {result['probability']:.3f}"
              + (f"  ({others})" if others else ""))


def predicted_image(result: dict) -> str:
    """The image a prediction is of: its path, and the box it was cropped to (a CSV may list one file twice)."""
    box = result.get("box")
    return f"{result['path']} [box {','.join(f'{v:g}' for v in box)}]" if box else result["path"]
