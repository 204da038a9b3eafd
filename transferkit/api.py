"""The Python API the CLI mirrors: `train(data, out, ...)` returns a `Run` with `.predict()` and `.evaluate()`."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.config import TrainConfig, read_config_file, resolve_config, write_config
from transferkit.data.loader import Labelled, labelled_split
from transferkit.data.sources import SPLITS, DatasetIndex, scan_dataset
from transferkit.data.transforms import Preprocess, eval_transform
from transferkit.errors import UserError
from transferkit.features.cache import cache_root
from transferkit.features.extract import FeatureExtractor, ViewLogitsOf, clean_view, head_logits, view_features
from transferkit.fileio import check_out_free, output_folder
from transferkit.models.classifier import Classifier, depth_levels, new_classifier
from transferkit.models.device import resolve_device
from transferkit.models.registry import BackboneSpec, create_imagenet_model, get_backbone
from transferkit.progress import Reporter
from transferkit.report import write_report
from transferkit.runs.ensemble import MEMBERS, Ensemble, ensemble_gain, write_ensemble
from transferkit.runs.files import build_meta, save_weights, write_json
from transferkit.runs.run import Run, open_run
from transferkit.runs.scope import warn_leaks
from transferkit.task.kinds import Task, task_for
from transferkit.training.callbacks import Callback, History, TensorBoard
from transferkit.training.checkpoint import Checkpoints
from transferkit.training.compute import Compute
from transferkit.training.distributed import Ranks, current_ranks
from transferkit.training.state import BestKeeper, Paused
from transferkit.training.trainer import Trainer
from transferkit.tuning import validation_choices


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_out(out: Path, overwrite: bool) -> None:
    check_out_free(out, overwrite)
    if (out / "meta.json").exists():
        shutil.rmtree(out)
    output_folder(out)


def train(
    data: str | Path | DatasetIndex,
    out: str | Path,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    recipe: str | None = None,
    config: str | None = None,
    callbacks: Sequence[Callback] = (),
    **options: Any,
) -> Run | None:
    """Scan the data, build the pretrained classifier, run both stages, save the run, evaluate it, write its report.

    `options` are TrainConfig fields (e.g. backbone="resnet50", epochs_frozen=5); None means "not given".
    Returns the loaded Run; `run.metrics` holds the evaluation (test split if there is one, else val). Under
    `accelerate launch` with several processes, ranks other than 0 return None (rank 0 saves and evaluates).
    `callbacks`: more `training.callbacks.Callback`s for the Trainer; one that raises Paused (`PauseAfter(N)`)
    leaves a run folder that `resume` finishes, and train returns None.
    """
    cfg: TrainConfig = resolve_config(recipe, config, **options)
    return _train(data, Path(out), cfg, Reporter(quiet), overwrite=overwrite, callbacks=callbacks)


# What may differ when a run is resumed (on another machine, say): where it computes, never what it computes.
RESUME_OPTIONS = ("workers", "device", "cache_dir", "cache")


def resume(out: str | Path, data: str | Path | DatasetIndex | None = None, quiet: bool = False,
           **machine: Any) -> Run | None:
    """Go on with an interrupted `train` (killed, pre-empted, out of disk) from its last checkpoint, with the run's
    own config.yaml and data (split.json's root, or `data` if the images moved), to the same result an
    uninterrupted run gets. `machine`: RESUME_OPTIONS to change (None: as before). A finished run is returned
    as it is."""
    out, reporter = Path(out), Reporter(quiet)
    if not (out / "config.yaml").is_file() or not (out / "split.json").is_file():
        raise UserError(f"{out} holds no run to resume (no config.yaml and split.json)")
    if (out / "meta.json").is_file() and (out / "metrics.json").is_file():
        reporter.log(f"{out} is already complete: nothing to resume")
        return load(out)
    try:
        saved_split = json.loads((out / "split.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {out / 'split.json'} to resume: {exc}") from None
    unknown = set(machine) - set(RESUME_OPTIONS)
    if unknown:
        raise UserError(f"a resumed run keeps its configuration; only {', '.join(RESUME_OPTIONS)} can change, "
                        f"not {', '.join(sorted(unknown))}")
    cfg = resolve_config(None, str(out / "config.yaml"), **machine, **legacy_defaults(out / "config.yaml"))
    return _train(data or saved_split["root"], out, cfg, reporter, resume_split=saved_split)


def legacy_defaults(config_path: Path) -> dict[str, Any]:
    """Values a run's config.yaml from before a default changed means by leaving them out: its feature maps were
    average-pooled (decision 0298)."""
    return {} if "pool" in read_config_file(config_path) else {"pool": "avg"}


def _train(data: str | Path | DatasetIndex, out: Path, cfg: TrainConfig, reporter: Reporter, overwrite: bool = False,
           resume_split: dict | None = None, callbacks: Sequence[Callback] = ()) -> Run | None:
    ranks = current_ranks(cfg.device)
    if len(cfg.members()) > 1:
        if ranks.distributed:
            raise UserError("several backbones train one after another in one process: drop --num-processes")
        return _train_ensemble(checked_data(data, out, cfg, reporter, resume_split), out, cfg, reporter, overwrite,
                               resume_split is not None, callbacks)
    if not ranks.main:  # rank 0 alone reports and writes
        reporter = Reporter(quiet=True)
    index = checked_data(data, out, cfg, reporter, resume_split)
    resuming = resume_split is not None
    if resuming and _finished_training(out):  # trained and saved; it stopped while evaluating
        return _evaluate_and_report(Run(out), index, cfg, reporter) if ranks.main else None
    built = Built.for_data(index, cfg, ranks)
    cfg = with_finetune_epochs(cfg, built.compute.device.type, len(index.split("train")), reporter)
    if not resuming and ranks.main:
        prepare_out(out, overwrite)  # only once everything that can fail on bad input has been checked
    if ranks.main:
        write_json(out / "split.json", {**index.split_json(), "root": index.root})
        write_config(cfg, out / "config.yaml")  # last: a folder with both can be resumed
    reporter.log(f"{len(index.classes)} classes, { {s: len(index.split(s)) for s in SPLITS} } images; backbone "
                 f"{built.spec.name} ({built.weights_source}); {built.pre.image_size}px; "
                 f"{built.compute.device.type}, {built.compute.precision}")
    if ranks.distributed:
        cfg = scaled_for(cfg, ranks, reporter)
    checkpoints = Checkpoints(out, cfg.checkpoint_every, resume=resuming, writes=ranks.main)
    # rank 0 alone writes the run folder's logs (built only there: each opens its file)
    folder = [History(out / "history.csv", checkpoints.history), TensorBoard(out / "tb", fresh=not resuming)] \
        if ranks.main else []
    trainer = Trainer(built.model, cfg, built.task, built.compute, reporter, ranks, checkpoints, [*folder, *callbacks])
    val_data = labelled_split(index, "val", cfg.box_margin)
    try:
        trainer.fine_tune(labelled_split(index, "train", cfg.box_margin), val_data, built.pre)
    except Paused:  # checkpoint, config and split are written: `resume` goes on from there
        return None
    except KeyboardInterrupt:
        trainer.keeper.restore(built.model)
        reporter.warn("interrupted: saving the best model so far")
        if ranks.main:
            save_run(out, built, trainer, index, val_data, interrupted=True)
        raise
    if not ranks.main:
        return None
    extract = save_run(out, built, trainer, index, val_data, interrupted=False)
    checkpoints.remove()
    return _evaluate_and_report(Run(out), index, cfg, reporter, extract)


def with_finetune_epochs(cfg: TrainConfig, device_type: str, train_images: int, reporter: Reporter) -> TrainConfig:
    """`epochs_finetune: auto` resolved for the device and data (TrainConfig.for_device), saying so where it skips
    the stage."""
    resolved = cfg.for_device(device_type, train_images)
    if cfg.epochs_finetune == "auto" and resolved.epochs_finetune == 0:
        reporter.log(f"fine-tuning: none (epochs_finetune auto: {train_images} training images on a CPU are too few "
                     "for it to have paid on the benchmark data; epochs_finetune N, in --config or --epochs-finetune, "
                     "fine-tunes)")
    return resolved


def _train_ensemble(index: DatasetIndex, out: Path, cfg: TrainConfig, reporter: Reporter, overwrite: bool,
                    resuming: bool, callbacks: Sequence[Callback]) -> Ensemble | None:
    """One run per backbone in RUN/members/NAME, each trained as `train` trains one and on the same split; RUN is
    their equal-weight average, evaluated and reported as one run (decision 0297). A resumed ensemble keeps its
    finished members and resumes the one that was interrupted."""
    members = cfg.members()
    if index.multilabel:  # the average's validation record (ensemble_gain) scores one label per image
        raise UserError(f"an ensemble of backbones needs one label per image; {index.root} has label sets: train "
                        "one backbone")
    for name, weights in members:  # before any member trains: a bad name or file fails the run at once
        get_backbone(name)
        if weights and not Path(weights).is_file():
            raise UserError(f"weights file not found: {weights}")
    if not resuming:
        prepare_out(out, overwrite)
        write_json(out / "split.json", {**index.split_json(), "root": index.root})
        write_config(cfg, out / "config.yaml")  # last: a folder with both can be resumed
    runs = []
    for number, (name, weights) in enumerate(members, 1):
        reporter.log(f"member {number} of {len(members)}: {name}")
        folder, member_cfg = out / MEMBERS / name, dataclasses.replace(cfg, backbone=name, weights=weights)
        if resuming and (folder / "config.yaml").is_file():
            run = resume(folder, index, reporter.quiet, **{option: getattr(cfg, option) for option in RESUME_OPTIONS})
        else:
            run = _train(index, folder, member_cfg, reporter, overwrite=True, callbacks=callbacks)
        if run is None:  # paused: `resume` goes on from this member
            return None
        on_feature_engine(run, member_cfg, reporter)
        runs.append(run)
    names = [name for name, _ in members]
    gain = ensemble_gain(runs, names, index, cfg.monitor)
    if not gain["better"]:
        reporter.warn(f"the average is not better on validation than {names[0]} alone ({cfg.monitor} "
                      f"{gain['ensemble'][cfg.monitor]:.4f} vs {gain['winner'][cfg.monitor]:.4f}); kept as asked")
    ensemble = write_ensemble(out, runs, names, gain)  # on these runs, still on their feature engines
    warn_leaks(ensemble.evaluate(index, drop_leaks=cfg.drop_leaks), reporter)
    write_report(ensemble)
    for run in runs:  # their engines are released: later calls on the returned ensemble go eager
        run.view_logits = None
    return ensemble


def checked_data(data: str | Path | DatasetIndex, out: Path, cfg: TrainConfig, reporter: Reporter,
                 resume_split: dict | None) -> DatasetIndex:
    """The scanned data, once it is known to be trainable as configured (and, resuming, the run's own images)."""
    index = data if isinstance(data, DatasetIndex) else scan_dataset(data, cfg.val_split, cfg.test_split, cfg.seed)
    for skipped in index.skipped:
        reporter.warn(f"skipped {skipped.path}: {skipped.reason}")
    split = {**index.split_json(), "root": index.root}
    if resume_split is not None and any(split[s] != resume_split.get(s) for s in SPLITS):
        raise UserError(f"the images in {index.root} are not the ones {out} started with (its split.json differs): "
                        "start a new run instead of resuming")
    if not index.split("val"):  # early stopping, the kept weights and every choice made after training need them
        raise UserError(f"no validation images in {index.root}: name some (a val/ folder, or 'val' in a CSV's split "
                        "column) or leave some images unsplit for --val-split to take")
    if cfg.operating_point != "default" and (len(index.classes) != 2 or index.multilabel):
        raise UserError(f"operating point '{cfg.operating_point}' needs a two-class task; {index.root} has "
                        f"{len(index.classes)} {'labels' if index.multilabel else 'classes'}")
    return index


@dataclass
class Built:
    """What a run trains: the pretrained backbone with its new head, the task, preprocessing and compute."""

    spec: BackboneSpec
    weights_source: str
    model: Classifier
    task: Task
    pre: Preprocess
    compute: Compute

    @classmethod
    def for_data(cls, index: DatasetIndex, cfg: TrainConfig, ranks: Ranks) -> Built:
        spec = get_backbone(cfg.backbone)
        compute = Compute(ranks.device or resolve_device(cfg.device), cfg.precision, cfg.accumulate)
        seed_everything(cfg.seed)
        imagenet_model, weights_source = create_imagenet_model(spec, cfg.weights)
        pre = Preprocess.for_model(imagenet_model, cfg.image_size, cfg.crop_pct)
        task = task_for(index.classes, index.multilabel, cfg.binary_logit)
        model = new_classifier(imagenet_model, task.outputs, cfg.head_spec(),
                               checked_depths(imagenet_model, cfg, index.multilabel), cfg.pool)
        return cls(spec, weights_source, model.to(compute.device), task, pre, compute)


def save_run(out: Path, built: Built, trainer: Trainer, index: DatasetIndex, val: Labelled, interrupted: bool
             ) -> FeatureExtractor:
    """model.safetensors, then meta.json (last: it marks the run as trained), with what was chosen on validation.
    Returns the saved model's feature extractor (`trained_extractor`), for evaluation to reuse."""
    cfg, model = trainer.config, built.model
    kept = kept_weights(trainer.keeper, cfg, interrupted)
    if kept:
        trainer.reporter.log(f"kept: {kept['reason']}")
    save_weights(model.cpu(), out / "model.safetensors")
    meta = build_meta(cfg, built.spec, built.weights_source, built.task, built.pre, interrupted)
    # stage 1's engine was compiled for the pretrained backbone with these depths (auto changed them since)
    compiled = trainer.features if cfg.feature_depths != "auto" else None
    extract = trained_extractor(model, cfg, trainer.reporter, pretrained_backbone(cfg, kept), compiled)
    fast_logits = head_logits(model, built.pre, cfg.augmentation().samplewise_center, extract)
    meta.update(task_meta(model, built.task, index, val, built.pre, cfg, trainer.reporter, fast_logits),
                feature_depths=list(model.depths), global_pool=model.global_pool,
                head_fit="exact" if cfg.solves_head and not index.multilabel else "sgd",
                **({"kept": kept} if kept else {}), **trainer.records)
    write_json(out / "meta.json", {**meta, "skipped_files": len(index.skipped)})
    return extract


def checked_depths(backbone: torch.nn.Module, cfg: TrainConfig, multilabel_data: bool) -> tuple[int, ...]:
    """The intermediate levels `feature_depths` names, each one the backbone has (auto: none until stage 1, which
    chooses with a single-label classifier)."""
    if cfg.feature_depths == "auto" and multilabel_data:
        raise UserError("feature_depths auto chooses among single-label heads; for multi-label data name the levels "
                        "(e.g. --feature-depths 2,3) or use last")
    depths = cfg.depths()
    if cfg.feature_depths != "last":
        levels = depth_levels(backbone)
        if any(d not in levels for d in depths):
            raise UserError(f"feature_depths {cfg.feature_depths}: this backbone has levels {levels[0]}..{levels[-1]}")
    return depths


def scaled_for(cfg: TrainConfig, ranks: Ranks, reporter: Reporter) -> TrainConfig:
    """Say what N processes do to the batch, and scale the learning rates if the config asks for it."""
    reporter.log(f"{ranks.world} processes ({ranks.backend}): global batch {cfg.batch_size * ranks.world} = "
                 f"{cfg.batch_size} per process x {ranks.world}")
    if not cfg.scale_lr:
        reporter.log(f"learning rates as configured (scale_lr: true multiplies them by {ranks.world})")
        return cfg
    scaled = dataclasses.replace(cfg, lr=cfg.lr * ranks.world, finetune_lr=cfg.finetune_lr * ranks.world)
    reporter.log(f"learning rates x{ranks.world} (linear scaling): lr {scaled.lr:g}, "
                 f"finetune_lr {scaled.finetune_lr:g}")
    return scaled


def _finished_training(out: Path) -> bool:
    """meta.json is written once training is over; a Ctrl-C'd run's says so and goes on from its checkpoint."""
    try:
        return not json.loads((out / "meta.json").read_text()).get("interrupted", False)
    except (OSError, ValueError):
        return False


def _evaluate_and_report(run: Run, index: DatasetIndex, cfg: TrainConfig, reporter: Reporter,
                         extract: FeatureExtractor | None = None) -> Run:
    """Metrics and report of a saved run; `extract`: save_run's (one feature extractor for both)."""
    extract = on_feature_engine(run, cfg, reporter, extract)
    run.plain_features = view_features(clean_view(run.preprocess, cfg.augmentation().samplewise_center), extract)
    warn_leaks(run.evaluate(index, drop_leaks=cfg.drop_leaks), reporter)
    write_report(run)
    # the compiled engine and its memory are released here, not at some later garbage collection: later calls on
    # the returned run go eager
    run.view_logits = run.plain_features = None
    return run


def on_feature_engine(run: Run, cfg: TrainConfig, reporter: Reporter, extract: FeatureExtractor | None = None
                      ) -> FeatureExtractor:
    """Make the saved run's logits come from the feature engine (and the cache, for a pretrained backbone) instead
    of eager PyTorch, until its `view_logits` is reset; the extractor used."""
    if extract is None:
        extract = trained_extractor(run.model, cfg, reporter, pretrained_backbone(cfg, run.meta.get("kept")))
    run.view_logits = head_logits(run.model, run.preprocess, cfg.augmentation().samplewise_center, extract)
    return extract


def pretrained_backbone(cfg: TrainConfig, kept: dict | None) -> bool:
    """Whether the saved backbone is the pretrained one (no fine-tuning, or its epochs were undone): then stage 1's
    cached features are its features."""
    return cfg.epochs_finetune == 0 or (kept is not None and kept["stage"] == "frozen")


def trained_extractor(model: torch.nn.Module, cfg: TrainConfig, reporter: Reporter, cached: bool,
                      compiled: FeatureExtractor | None = None) -> FeatureExtractor:
    """Features after training from the feature engine rather than eager PyTorch, through the cache when the
    backbone is the pretrained one (stage 1's rows, and the test images' from here on; stage 1's `compiled`
    extractor is reused); a fine-tuned backbone's are computed once, on a newly compiled engine (safe since decision
    0290), and not kept."""
    if cached and compiled is not None:
        return compiled
    cache = cache_root(cfg.cache, cfg.cache_dir) if cached else None
    return FeatureExtractor(model, cfg.feature_engine, cfg.batch_size, cfg.workers, reporter, cache)


def kept_weights(keeper: BestKeeper, cfg: TrainConfig, interrupted: bool) -> dict | None:
    """Which epoch of which stage the saved weights are from, and why (meta.json's and metrics.json's `kept`)."""
    if not keeper.best_epoch:
        return None
    stage, epoch = keeper.best_epoch
    best = f"best {cfg.monitor} {keeper.best:.4f}"
    if stage == "frozen" and cfg.epochs_finetune and not interrupted:
        reason = (f"fine-tuning did not beat the frozen head ({best} at frozen epoch {epoch}): the head from frozen "
                  f"epoch {epoch} was kept")
    else:
        reason = f"{best} at {stage} epoch {epoch}: those weights were kept"
    return {"stage": stage, "epoch": epoch, "monitor": cfg.monitor, "value": keeper.best, "reason": reason}


def task_meta(model: torch.nn.Module, task: Task, index: DatasetIndex, val: Labelled, pre: Preprocess,
              cfg: TrainConfig, reporter: Reporter, view_logits: ViewLogitsOf | None = None) -> dict:
    """meta.json entries beyond a plain classifier's: the margin of boxed data, and what is chosen on the
    validation images (test-time augmentation, temperature, decision thresholds)."""
    extra: dict = {"box_margin": cfg.box_margin} if any(s.box for s in index.samples) else {}
    transform = eval_transform(pre, cfg.augmentation().samplewise_center)
    extra.update(validation_choices(model, val, transform, task, cfg.tta, cfg.operating_point, reporter,
                                    view_logits))
    return extra


def load(path: str | Path) -> Run:
    """A run folder, or an ensemble's (the same interface), with `metrics` from its metrics.json where it has one."""
    run, metrics = open_run(path), Path(path) / "metrics.json"
    if metrics.is_file():
        run.metrics = json.loads(metrics.read_text())
    return run
