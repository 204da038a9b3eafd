"""`transferkit auto` and `transferkit lr-find`: thin commands over transferkit.auto."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from transferkit.cli.main import app
from transferkit.cli.output import (
    BATCH_SIZE,
    CACHE_DIR,
    CONFIG,
    DEVICE,
    IMAGE_SIZE,
    JSON,
    NO_CACHE,
    OVERWRITE,
    QUIET,
    RECIPE,
    TEST_SPLIT,
    VAL_SPLIT,
    WORKERS,
    announced_run_folder,
    check_paths,
    print_json,
)
from transferkit.cli.training import print_metrics_summary
from transferkit.config import resolve_config
from transferkit.fileio import check_suffix
from transferkit.options import check_time_budget
from transferkit.progress import console


@app.command()
def auto(
    data: Annotated[str, typer.Argument(help="Image folder (train/val[/test] or class subfolders) or CSV.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder to write.",
                                             show_default="runs/NAME-auto, NAME being the data's")] = None,
    time_budget: Annotated[float, typer.Option(help="Minutes for everything: probing and training.")] = 30.0,
    backbones: Annotated[str | None, typer.Option(help="Candidates, e.g. a,b or a=weights.safetensors,b "
                                                  "(default: every backbone with offline weights).")] = None,
    weights: Annotated[str | None, typer.Option(help="Weights file of the one backbone in --backbones.")] = None,
    recipe: RECIPE = None,
    config: CONFIG = None,
    image_size: IMAGE_SIZE = None,
    batch_size: BATCH_SIZE = None,
    val_split: VAL_SPLIT = None,
    test_split: TEST_SPLIT = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the split, the folds and training.")] = None,
    workers: WORKERS = None,
    device: DEVICE = None,
    cache_dir: CACHE_DIR = None,
    no_cache: NO_CACHE = False,
    overwrite: OVERWRITE = False,
    quiet: QUIET = False,
    json_out: JSON = False,
) -> None:
    """Pick the backbone that transfers best (cross-validated linear probes on cached features, then a fine-tuning
    race of the two best), its head, learning rate and how much to fine-tune, and train it within the time
    budget; writes a run folder with leaderboard.csv."""
    options = dict(image_size=image_size, batch_size=batch_size, val_split=val_split, test_split=test_split,
                   seed=seed, workers=workers, device=device, cache_dir=cache_dir, cache=False if no_cache else None)
    check_time_budget(time_budget)
    resolve_config(recipe, config, **options)  # a bad option answers here, before PyTorch loads
    check_paths(data, out, overwrite)
    if out is None:
        out = announced_run_folder(data, "-auto", quiet)
    from transferkit.auto import auto as run_auto

    result = run_auto(data, out, time_budget=time_budget, backbones=backbones, weights=weights, overwrite=overwrite,
                      quiet=quiet, recipe=recipe, config=config, **options)
    if json_out:
        print_json({**result.summary, "metrics": result.run.metrics})
    elif not quiet:
        for row in result.summary["leaderboard"]:
            mark = "  <- chosen" if row["chosen"] else ""
            console.print(f"{row['backbone']}: probe accuracy {row['probe_accuracy']:.3f} ± {row['sd']:.3f}, "
                          f"{row['params'] / 1e6:.2f}M params, {row['seconds']:.1f}s{mark}")
        print_metrics_summary(result.run.metrics)
        console.print(f"run folder: {out}")


@app.command("lr-find")
def lr_find(
    source: Annotated[str, typer.Argument(help="A run's config.yaml (its training split), or DATA.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the loss-vs-learning-rate plot (PNG).")] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone (see `transferkit backbones`).")] = None,
    weights: Annotated[str | None, typer.Option(help="ImageNet weights file when offline.")] = None,
    image_size: IMAGE_SIZE = None,
    recipe: RECIPE = None,
    config: CONFIG = None,
    batch_size: BATCH_SIZE = None,
    workers: WORKERS = None,
    cache_dir: CACHE_DIR = None,
    no_cache: NO_CACHE = False,
    quiet: QUIET = False,
    json_out: JSON = False,
) -> None:
    """Learning-rate range test for the head on the frozen features: suggests the stage-1 learning rate."""
    if out is not None:
        check_suffix(out, (".png",))
    from transferkit.auto import lr_find_data, plot_lr_find

    result = lr_find_data(source, quiet=quiet, recipe=recipe, config=config, backbone=backbone, weights=weights,
                          image_size=image_size, batch_size=batch_size, workers=workers, cache_dir=cache_dir,
                          cache=False if no_cache else None)
    if out is not None:
        plot_lr_find(result, out)
    if json_out:
        print_json(result.to_json())
    else:
        print(f"suggested learning rate: {result.suggested_lr:.2e} (steepest descent of the smoothed loss)")
        if out is not None:
            print(f"plot: {out}")
