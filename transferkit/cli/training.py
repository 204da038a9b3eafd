"""`transferkit train`, `evaluate` and `predict`: thin commands over transferkit.api and transferkit.run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from transferkit.cli.main import INVOCATION, app
from transferkit.cli.output import (
    BATCH_SIZE,
    CACHE_DIR,
    CONFIG,
    DEVICE,
    DROP_LEAKS,
    ENGINE,
    IMAGE_SIZE,
    JSON,
    NO_CACHE,
    OVERWRITE,
    POOL,
    QUIET,
    RECIPE,
    SETTINGS,
    TEST_SPLIT,
    VAL_SPLIT,
    WORKERS,
    announced_run_folder,
    check_paths,
    predicted_image,
    print_json,
    print_predictions,
    report_skipped,
)
from transferkit.config import resolve_config
from transferkit.config_keys import parse_settings
from transferkit.errors import UserError
from transferkit.options import AUGMENT_PRESETS, check_evaluated_split
from transferkit.progress import console
from transferkit.runs.folder import check_run_folder


def parse_hidden(value: str | None) -> list[int] | None:
    """--head-hidden 1024,512 -> [1024, 512]; "" -> [] (a linear head)."""
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--head-hidden expects comma-separated layer widths, got '{value}'") from None


PER_CLASS_SHOWN = 20  # more classes than this make one unreadable line; metrics.json has them all


def print_metrics_summary(metrics: dict) -> None:
    if metrics.get("split_note"):  # which images, and what they were to training (a val figure chose the epoch)
        console.print(f"evaluated: {metrics['split_note']}")
    if metrics.get("task") == "multilabel":
        from transferkit.task.multilabel import summary_line

        console.print(summary_line(metrics))
        return
    parts = [f"{metrics['split']} accuracy {metrics['accuracy']:.4f}"]
    if metrics.get("balanced_accuracy") is not None:
        parts.append(f"balanced {metrics['balanced_accuracy']:.4f}")
    if metrics.get("top5_accuracy") is not None:
        parts.append(f"top-5 {metrics['top5_accuracy']:.4f}")
    if metrics.get("auc") is not None:
        parts.append(f"AUC {metrics['auc']:.4f}")
    elif metrics.get("auc_note"):
        parts.append(f"AUC {metrics['auc_note']}")
    parts.append(f"loss {metrics['loss']:.4f} (n={metrics['n']})")
    if metrics.get("ece") is not None:
        parts.append(f"ECE {metrics['ece']:.4f}")
    console.print(", ".join(parts))
    if len(metrics["per_class"]) <= PER_CLASS_SHOWN:
        console.print("recall per class: " + ", ".join(
            f"{name} {m['recall']:.3f}" if m["recall"] is not None else f"{name} undefined (no images)"
            for name, m in metrics["per_class"].items()))


DATA = Annotated[str | None, typer.Argument(
    help="Image folder (train/val[/test] or class subfolders), CSV or packed shards.")]
OUT = Annotated[Path | None, typer.Option("--out", "-o", help="Run folder to write.",
                                          show_default="runs/NAME, NAME being the data's; runs/NAME-2, … if taken")]
RESUME = Annotated[Path | None, typer.Option(
    help="Continue this interrupted run from its last checkpoint, with its own config and data.")]
CHECKPOINT_EVERY = Annotated[int | None, typer.Option(
    help="Optimizer steps between checkpoints (also one per epoch); 0: per epoch only.")]
NUM_PROCESSES = Annotated[int | None, typer.Option(
    min=1, help="Train in N processes on this machine (DDP via accelerate: gloo on CPU, nccl on GPUs).")]
BACKBONE = Annotated[str | None, typer.Option(
    help="Backbone (see `transferkit backbones`); several, comma-separated, train one run each and keep their "
         "average.")]
WEIGHTS = Annotated[str | None, typer.Option(help="ImageNet weights file when offline.")]
EPOCHS_FROZEN = Annotated[int | None, typer.Option(help="Epochs training the head on the frozen base.")]
EPOCHS_FINETUNE = Annotated[str | None, typer.Option(
    help="Epochs fine-tuning after unfreezing; auto: 3 on a GPU, and on a CPU from 700 training images (below, it "
         "did not beat the frozen head there); else none.")]
UNFREEZE = Annotated[str | None, typer.Option(help="'all' or the number of top blocks to unfreeze.")]
LR = Annotated[float | None, typer.Option(help="Head learning rate in the frozen stage.")]
FINETUNE_LR = Annotated[float | None, typer.Option(help="Head learning rate when fine-tuning.")]
OPTIMIZER = Annotated[str | None, typer.Option(help="adam, adamw, rmsprop or sgd.")]
SCHEDULE = Annotated[str | None, typer.Option(help="constant, cosine, onecycle or inverse_time.")]
AUGMENT = Annotated[str | None, typer.Option(help=f"{', '.join(AUGMENT_PRESETS)}.")]
HEAD_HIDDEN = Annotated[str | None, typer.Option(help="Hidden dense layers, e.g. 1024,512.")]
HEAD_DROPOUT = Annotated[float | None, typer.Option(help="Dropout before the head.")]
HEAD_FIT = Annotated[str | None, typer.Option(
    help="Frozen-stage linear head: exact (solved, C chosen on validation; default) or sgd (epochs).")]
FEATURE_DEPTHS = Annotated[str | None, typer.Option(
    help="last, auto (chosen on validation) or levels like 2,3,4: features also from intermediate depths.")]
LABEL_SMOOTHING = Annotated[float | None, typer.Option(help="Label smoothing.")]
PATIENCE = Annotated[int | None, typer.Option(help="Early-stopping patience in epochs (0: off).")]
TTA = Annotated[str | None, typer.Option(
    help="Test-time augmentation: auto (chosen on validation), none, flip or dihedral (8 views).")]
OPERATING_POINT = Annotated[str | None, typer.Option(
    help="Two classes: the decision threshold chosen on validation: default (p >= 0.5), accuracy, balanced, "
         "recall=R or precision=P.")]
BOX_MARGIN = Annotated[float | None, typer.Option(help="CSV boxes: fraction of the box's size added on each side.")]
SEED = Annotated[int | None, typer.Option(help="Seed: same seed, same run.")]
PRECISION = Annotated[str | None, typer.Option(help="auto (CUDA: fp16 AMP, CPU: fp32), fp32, bf16, fp16.")]
ACCUMULATE = Annotated[int | None, typer.Option(help="Gradient accumulation: step every N batches.")]

# train's arguments that are not configuration keys: everything else it takes is passed on under its own name
NOT_CONFIGURATION = ("data", "out", "resume", "num_processes", "recipe", "config", "settings", "no_cache",
                     "drop_leaks", "overwrite", "quiet", "json_out")


@app.command()
def train(
    data: DATA = None, out: OUT = None, resume: RESUME = None, checkpoint_every: CHECKPOINT_EVERY = None,
    num_processes: NUM_PROCESSES = None, backbone: BACKBONE = None, weights: WEIGHTS = None, recipe: RECIPE = None,
    config: CONFIG = None, settings: SETTINGS = None, epochs_frozen: EPOCHS_FROZEN = None,
    epochs_finetune: EPOCHS_FINETUNE = None, unfreeze: UNFREEZE = None, batch_size: BATCH_SIZE = None,
    lr: LR = None, finetune_lr: FINETUNE_LR = None, optimizer: OPTIMIZER = None, schedule: SCHEDULE = None,
    augment: AUGMENT = None, image_size: IMAGE_SIZE = None, head_hidden: HEAD_HIDDEN = None,
    head_dropout: HEAD_DROPOUT = None, head_fit: HEAD_FIT = None, feature_depths: FEATURE_DEPTHS = None,
    pool: POOL = None, label_smoothing: LABEL_SMOOTHING = None, patience: PATIENCE = None, tta: TTA = None,
    operating_point: OPERATING_POINT = None, val_split: VAL_SPLIT = None, test_split: TEST_SPLIT = None,
    box_margin: BOX_MARGIN = None, seed: SEED = None, workers: WORKERS = None, device: DEVICE = None,
    precision: PRECISION = None, accumulate: ACCUMULATE = None, cache_dir: CACHE_DIR = None,
    no_cache: NO_CACHE = False, drop_leaks: DROP_LEAKS = False, overwrite: OVERWRITE = False, quiet: QUIET = False,
    json_out: JSON = False,
) -> None:
    """Train a classifier: a new head on a frozen pretrained base, then fine-tuning where it pays (on a GPU, or from
    700 training images); writes a run folder."""
    options = configuration_options(locals())
    argv = INVOCATION
    if resume is None:  # bad options and paths fail here: once, not in every process, and before torch loads
        check_train_arguments(data, out, overwrite, recipe, config, options)
        if out is None:
            out = announced_run_folder(data, "", quiet)
            argv = [*argv, "--out", str(out)]  # every process of a multi-process run writes this one folder
    if num_processes and num_processes > 1 and "WORLD_SIZE" not in os.environ:
        from transferkit.cli.launch import launch_processes

        raise typer.Exit(launch_processes(num_processes, argv))
    from transferkit import api

    if resume is not None:
        check_resume_alone({**options, "recipe": recipe, "config": config, "out": out, "overwrite": overwrite or None})
        if data is not None:  # where the images moved to: a wrong path answers even for a finished run
            check_paths(data)
        run = api.resume(resume, data, quiet, **{name: options.get(name) for name in api.RESUME_OPTIONS})
    else:
        run = api.train(data, out, overwrite=overwrite, quiet=quiet, recipe=recipe, config=config, **options)
    if run is None:  # a rank other than 0 of a multi-process run: rank 0 reports
        return
    if json_out:
        print_json(run.metrics)
    elif not quiet:
        print_metrics_summary(run.metrics)
        console.print(f"run folder: {run.path}")


def configuration_options(arguments: dict) -> dict:
    """train's given options as configuration keys, `--set` ones first so that a named option wins over them."""
    given = {name: value for name, value in arguments.items() if name not in NOT_CONFIGURATION}
    epochs = given["epochs_finetune"]
    given.update(epochs_finetune=int(epochs) if epochs and epochs.isdigit() else epochs,
                 head_hidden=parse_hidden(given["head_hidden"]), cache=False if arguments["no_cache"] else None,
                 drop_leaks=True if arguments["drop_leaks"] else None)
    named = {key: value for key, value in given.items() if value is not None}
    return {**parse_settings(arguments["settings"]), **named}


def check_resume_alone(given: dict) -> None:
    """--resume takes only the machine's options (api.RESUME_OPTIONS): the run's config.yaml holds the rest."""
    from transferkit.api import RESUME_OPTIONS

    flags = [f"--{name.replace('_', '-')}" for name, value in given.items()
             if value is not None and name not in RESUME_OPTIONS]
    if flags:
        raise UserError(f"--resume continues the run with its own config.yaml: drop {', '.join(flags)}")


def check_train_arguments(data: str | None, out: Path | None, overwrite: bool, recipe: str | None,
                          config: str | None, options: dict) -> None:
    """Bad options and paths answer before PyTorch is imported (see check_paths)."""
    if data is None:
        raise UserError("train needs DATA (or --resume RUN)")
    resolve_config(recipe, config, **options)
    check_paths(data, out, overwrite)


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    data: Annotated[str, typer.Argument(help="Image folder or CSV to evaluate on.")],
    split: Annotated[str | None, typer.Option(
        help="train, val, test or all.", show_default="the run's own data: test if any, else val; other data: all")
    ] = None,
    drop_leaks: DROP_LEAKS = False,
    json_out: JSON = False,
) -> None:
    """Metrics (accuracy, top-5, AUC, per class, confusion) on a dataset; writes metrics.json, predictions.csv,
    figures and report.html."""
    check_evaluated_split(split)  # before PyTorch loads
    check_run_folder(run)
    check_paths(data)
    from transferkit.progress import Reporter
    from transferkit.report import write_report
    from transferkit.runs.run import open_run
    from transferkit.runs.scope import warn_leaks

    loaded = open_run(run)
    metrics = loaded.evaluate(data, split, drop_leaks=drop_leaks)
    warn_leaks(metrics, Reporter())
    write_report(loaded)
    report_skipped_dicts(metrics["skipped_files"])
    print_json(metrics) if json_out else print_metrics_summary(metrics)


def report_skipped_dicts(skipped: list[dict]) -> None:
    from transferkit.data.sources import Skipped

    report_skipped([Skipped(s["path"], s["reason"]) for s in skipped])


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    images: Annotated[list[str], typer.Argument(help="Images, folders of images or dataset CSVs (boxes are cropped).")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many labels to list per image.")] = 3,
    engine: ENGINE = "auto",
    json_out: JSON = False,
) -> None:
    """Labels and probabilities for images, from the run folder alone (a multi-label run: every label above its
    threshold)."""
    from transferkit.prediction import collect_inputs, prediction_records
    from transferkit.predictor import load_predictor

    paths, boxes, skipped = collect_inputs(images)  # a wrong path answers before a model is loaded
    predictor = load_predictor(run, engine)
    results = prediction_records(predictor, paths, boxes, top_k)
    report_skipped(skipped)
    if json_out:
        print_json(results)
    elif predictor.thresholds is not None:
        print_label_sets(results)
    else:
        print_predictions(results)


def print_label_sets(results: list[dict]) -> None:
    """One line per image: its labels, then every label's probability."""
    for result in results:
        chosen = ", ".join(result["labels"]) or "(no label above its threshold)"
        scores = ", ".join(f"{label} {p:.3f}" for label, p in result["probabilities"].items())
        print(f"{predicted_image(result)}: {chosen}  ({scores})")
