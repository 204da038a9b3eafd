"""`transferkit doctor DATA`: data health before training, as a readable summary or (--json) one JSON object."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from transferkit.cli.main import app
from transferkit.cli.output import (
    CACHE_DIR,
    IMAGE_SIZE,
    JSON,
    NO_CACHE,
    POOL,
    QUIET,
    TEST_SPLIT,
    VAL_SPLIT,
    WORKERS,
    check_paths,
    print_json,
)
from transferkit.errors import UserError

SHOWN = 10  # items listed per finding in the summary; --json / --out hold them all
SHOWN_FILES = 4  # files listed per group
STATUS_COLOURS = {"ok": "green", "fix": "red", "review": "yellow"}
out_console = Console(highlight=False, soft_wrap=True)  # the summary is the output: stdout, unwrapped for pipes


@app.command()
def doctor(
    data: Annotated[str, typer.Argument(help="Image folder (train/val[/test] or class subfolders) or CSV.")],
    backbone: Annotated[str | None, typer.Option(help="Backbone for the embeddings (as train).")] = None,
    weights: Annotated[str | None, typer.Option(help="ImageNet weights file when offline.")] = None,
    image_size: IMAGE_SIZE = None,
    crop_pct: Annotated[float | None, typer.Option(help="Centre-crop fraction (default: the backbone's).")] = None,
    pool: POOL = None,
    near_threshold: Annotated[float | None, typer.Option(help="Embedding cosine from which images are near "
                                                         "duplicates (default 0.95).")] = None,
    max_imbalance: Annotated[float | None, typer.Option(help="Flag largest / smallest class count above this "
                                                        "(default 3).")] = None,
    min_size: Annotated[int | None, typer.Option(help="Flag images with a side below this many pixels, or below "
                                                 "input size / 4 (default 32).")] = None,
    val_split: VAL_SPLIT = None,
    test_split: TEST_SPLIT = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the split and of the cross-validation folds.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per backbone batch.")] = None,
    workers: WORKERS = None,
    cache_dir: CACHE_DIR = None,
    no_cache: NO_CACHE = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the JSON report to this file.")] = None,
    quiet: QUIET = False,
    json_out: JSON = False,
) -> None:
    """Check a dataset before training: unreadable files, exact and near duplicates, train/val leakage, class
    imbalance, tiny images, blurry / dark / light / low-information / odd-sized / grayscale images,
    possibly mislabeled images. Exit code 0 whatever it finds."""
    if out is not None and out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'doctor.json'}")
    check_paths(data)
    from transferkit.doctor import DoctorOptions

    given = dict(backbone=backbone, weights=weights, image_size=image_size, crop_pct=crop_pct, pool=pool,
                 near_threshold=near_threshold, max_imbalance=max_imbalance, min_size=min_size, val_split=val_split,
                 test_split=test_split, seed=seed, batch_size=batch_size, workers=workers, cache_dir=cache_dir)
    # validated before `diagnose` imports PyTorch: a bad option answers at once, like a bad path
    options = DoctorOptions(**{k: v for k, v in given.items() if v is not None}, cache=not no_cache,
                            quiet=quiet).validate()
    from transferkit.doctor import diagnose
    from transferkit.runs.files import write_json

    report = diagnose(data, options)
    print_json(report) if json_out else print_report(report)
    if out is not None:
        write_json(out, report)  # a failed write is a one-line UserError


def print_report(report: dict) -> None:
    backbone, settings = report["backbone"], report["settings"]
    root = _common_folder(report)
    out_console.print(f"{len(report['classes'])} classes, {report['images']} images in {escape(report['data'])} "
                      f"({report['layout']}); embeddings: {backbone['name']} at {backbone['image_size']} px"
                      f"{_pooled(backbone['pool'])}; "
                      f"paths below are relative to {escape(root)}")
    show = _lister(root)
    show(report["skipped"], "unreadable or skipped", "file", lambda f: f"{_rel(f['path'], root)}: {f['reason']}")
    show(report["exact_duplicates"], "exact duplicates", "group", lambda g: _files(g["files"], root))
    show(report["near_duplicates"], f"near duplicates (cosine >= {settings['near_threshold']})", "group",
         lambda g: f"{g['similarity']:.3f}: {_files(g['files'], root)}")
    show(report["leakage"], "train / held-out leakage", "group",
         lambda leak: f"{leak['kind']}: {_some([f'{_rel(path, root)} [train]' for path in leak['train']])} = "
                      + _files(leak["held_out"], root))
    _print_balance(report["class_balance"])
    show(report["tiny_images"], f"tiny images (a side below {settings['min_side']} px)", "image",
         lambda f: f"{_rel(f['path'], root)}: {f['width']}x{f['height']}")
    show(report["image_issues"], "image quality (CleanVision)", "image",
         lambda f: f"{_rel(f['path'], root)}: {', '.join(f['issues'])}")
    # "review", not "fix": on the benchmarks fewer than half of the flagged labels were wrong (decision 0307)
    show(report["mislabeled"], "possibly mislabeled", "image",
         lambda s: f"{_rel(s['path'], root)}: labelled {s['label']} ({s['label_probability']:.2f}), "
                   f"looks like {s['suggested']} ({s['probability']:.2f})", found="review")
    for note in report["notes"]:
        out_console.print(f"note: {escape(note)}")
    findings = report["summary"]["findings"]
    out_console.print("no problems found" if not findings else f"{findings} findings")


def _pooled(pool: str | None) -> str:
    return f", {pool}-pooled" if pool else ""


def _lister(root: str) -> Callable[..., None]:
    def show(items: list, title: str, unit: str, describe: Callable[[Any], str], found: str = "fix") -> None:
        if not items:
            out_console.print(f"{_status('ok')}{escape(title)}: none")
            return
        out_console.print(f"{_status(found)}{escape(title)}: {len(items)} {unit}{'' if len(items) == 1 else 's'}")
        for item in items[:SHOWN]:
            out_console.print(f"       {escape(describe(item))}")
        if len(items) > SHOWN:
            out_console.print(f"       ... and {len(items) - SHOWN} more (all of them in --json / --out)")

    return show


def _status(word: str) -> str:
    """A check's outcome, coloured and padded so every check's name (and its listed files) starts in column 7."""
    colour = STATUS_COLOURS[word]
    return f"[{colour}]{word}[/{colour}]" + " " * (7 - len(word))


def _print_balance(balance: dict) -> None:
    counts = ", ".join(f"{name} {n}" for name, n in balance["counts"].items())
    ratio = "an empty class" if balance["ratio"] is None else f"largest/smallest {balance['ratio']:g}"
    above = balance["ratio"] is not None and balance["ratio"] > balance["max_ratio"]
    limit = f" (above {balance['max_ratio']:g})" if above else ""
    problem = f"; {balance['problem']}" if balance["problem"] else ""
    out_console.print(f"{_status('fix' if balance['flagged'] else 'ok')}class balance: {ratio}{limit}: "
                      f"{escape(counts)}{escape(problem)}")


def _files(files: list[dict], root: str) -> str:
    return _some([f"{_rel(f['path'], root)} [{f['split']}]" for f in files])


def _some(items: list[str]) -> str:
    """The first few of a group: a group can hold thousands of alike images."""
    more = f" and {len(items) - SHOWN_FILES} more" if len(items) > SHOWN_FILES else ""
    return ", ".join(items[:SHOWN_FILES]) + more


def _common_folder(report: dict) -> str:
    """The data folder, or for a CSV the folder holding every listed file: shorter lines, same meaning."""
    if os.path.isdir(report["data"]):
        return report["data"]
    listed = [f["path"] for key in ("skipped", "tiny_images", "image_issues", "mislabeled") for f in report[key]]
    listed += [f["path"] for key in ("exact_duplicates", "near_duplicates") for g in report[key] for f in g["files"]]
    return os.path.commonpath([os.path.dirname(path) for path in listed or [report["data"]]])


def _rel(path: str, root: str) -> str:
    relative = os.path.relpath(path, root)
    return path if relative.startswith("..") else relative
