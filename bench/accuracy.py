"""Accuracy benchmark: training configurations side by side on real data, mean ± sd over seeded splits.

Every row trains on the same cached Lite0 features (transferkit's own feature engine and cache), so the rows differ
only in what they make of them: the linear-probe anchor (scikit-learn logistic regression on standardised
features, C by 5-fold cross-validation on the training split), stage 1 as it runs in transferkit with each head
and depth option, and (--finetune, slow on CPU) both stages. Metrics on the test split: accuracy, balanced
accuracy, ROC AUC (macro one-vs-rest for several classes), log-loss, expected calibration error (15 bins), and the
wall time of the row (features come from the cache, warmed first; the extraction time is reported apart). Rows pool
the feature maps by their average, as transferkit did before decision 0298, unless their name ends in `-max`.

    python bench/accuracy.py                        # elpv, fmnist20, fmnist100; 3 seeds; frozen rows + probe
    python bench/accuracy.py --quick                # smoke test: fmnist20, 2 seeds, 500 test images
    python bench/accuracy.py --finetune --datasets elpv
    python bench/accuracy.py --views --rows frozen-sgd,frozen-exact   # 1 feature view against 3

    python bench/accuracy.py --datasets food --seeds 5 --rows probe,default,lite2-default   # real photos

Fashion-MNIST needs Debian's `dataset-fashion-mnist` package, the food photos Node.js' `npm` (the script says so
when either is missing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean, stdev

import numpy as np
import torch
from accuracy_data import Split, load_split  # bench/: run as a script, no package
from measure import machine_info, table
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from transferkit.config import resolve_config
from transferkit.data.transforms import Preprocess, eval_transform
from transferkit.errors import UserError
from transferkit.features.cache import default_cache_dir
from transferkit.features.extract import FeatureExtractor, symmetry_view
from transferkit.models import tta
from transferkit.models.classifier import Classifier, depth_columns, depth_levels, new_classifier
from transferkit.models.registry import create_imagenet_model, get_backbone
from transferkit.progress import Reporter
from transferkit.runs.run import infer_logits
from transferkit.task.kinds import task_for
from transferkit.training.compute import Compute
from transferkit.training.exact_head import C_GRID
from transferkit.training.trainer import Trainer

BACKBONE = "tf_efficientnet_lite0"
QUIET = Reporter(quiet=True)
DIHEDRAL = {"head_fit": "exact", "augment": "dihedral", "tta": "dihedral"}
# TrainConfig values of each row (on top of the data set's preprocessing, one clean feature view as in the demo)
ROWS: dict[str, dict | None] = {
    "probe": None,  # the anchor: scikit-learn on the features, outside transferkit's training
    "default": {"feature_views": "auto"},  # today's default stage 1 (decision 0280), its views chosen by size
    "frozen-sgd": {"head_fit": "sgd"},
    "frozen-exact": {"head_fit": "exact"},
    "depths-sgd": {"head_fit": "sgd", "feature_depths": "auto"},
    "depths-exact": {"head_fit": "exact", "feature_depths": "auto"},
    # the 8 symmetries of the square as training views and as test-time views (decision 0244)
    "dihedral-exact": DIHEDRAL,
    "dihedral-depths-exact": {**DIHEDRAL, "feature_depths": "auto"},
    # the image and its mirror, as training views and as test-time views (decision 0294)
    "flip-exact": {"head_fit": "exact", "augment": "flip", "tta": "flip"},
    # feature maps pooled by their maximum instead of their average (decision 0298); every other row pools by average
    "default-max": {"feature_views": "auto", "pool": "max"},
    "frozen-max": {"head_fit": "exact", "pool": "max"},  # one clean view, where auto gives small sets 3
    "depths-max": {"head_fit": "exact", "feature_depths": "auto", "pool": "max"},
    "dihedral-max": {**DIHEDRAL, "pool": "max"},
    "dihedral-depths-max": {**DIHEDRAL, "feature_depths": "auto", "pool": "max"},
    "flip-max": {"head_fit": "exact", "augment": "flip", "tta": "flip", "pool": "max"},
    # class_balance on the solved head (decision 0280): inverse-frequency class weights
    "exact-weighted": {"head_fit": "exact", "class_balance": "weights"},
    "dihedral-exact-weighted": {**DIHEDRAL, "class_balance": "weights"},
    "max-weighted": {"head_fit": "exact", "pool": "max", "class_balance": "weights"},
}
# the dihedral head at other input sizes and on larger backbones (ELPV's cells are 300 px)
SIZE_ROWS = {
    "dihedral-exact-300": {**DIHEDRAL, "image_size": 300},
    "lite1-dihedral-exact-300": {**DIHEDRAL, "image_size": 300, "backbone": "tf_efficientnet_lite1"},
    "lite2-dihedral-exact-300": {**DIHEDRAL, "image_size": 300, "backbone": "tf_efficientnet_lite2"},
    "lite1-dihedral-exact": {**DIHEDRAL, "backbone": "tf_efficientnet_lite1"},  # its own 240 px
    "lite2-dihedral-exact": {**DIHEDRAL, "backbone": "tf_efficientnet_lite2"},  # its own 260 px
    # the larger offline backbones at their own sizes, on clean and mirrored views (natural photos)
    "mobilenetv2-exact": {"head_fit": "exact", "backbone": "mobilenetv2_100"},
    "lite1-exact": {"head_fit": "exact", "backbone": "tf_efficientnet_lite1"},
    "lite2-exact": {"head_fit": "exact", "backbone": "tf_efficientnet_lite2"},
    "mobilenetv2-max": {"head_fit": "exact", "backbone": "mobilenetv2_100", "pool": "max"},
    "lite1-max": {"head_fit": "exact", "backbone": "tf_efficientnet_lite1", "pool": "max"},
    "lite2-max": {"head_fit": "exact", "backbone": "tf_efficientnet_lite2", "pool": "max"},
    "lite2-flip-exact": {"head_fit": "exact", "augment": "flip", "tta": "flip", "backbone": "tf_efficientnet_lite2"},
    # Lite0's max-pooled head above its 224 px training size (FixRes: objects look larger after training's crops)
    "max-256": {"head_fit": "exact", "pool": "max", "image_size": 256},
    "max-288": {"head_fit": "exact", "pool": "max", "image_size": 288},
    "max-320": {"head_fit": "exact", "pool": "max", "image_size": 320},
    # ELPV's cells at their own 300 px, max-pooled (a crack is one strong activation however large the map)
    "max-300": {"head_fit": "exact", "pool": "max", "image_size": 300},
    "max-uncropped": {"head_fit": "exact", "pool": "max", "crop_pct": 1.0},
}
# --views: stage 1 on 3 feature views per training image (1 clean + 2 augmented) against the rows' single clean view
VIEW_ROWS = {
    "frozen-sgd-views3": {"head_fit": "sgd", "feature_views": 3},
    "frozen-exact-views3": {"head_fit": "exact", "feature_views": 3},
}
FINETUNE_ROWS = {
    # `transferkit train` as it runs by default (stage 1, then fine-tuning 3 epochs), on Lite0 and on Lite2
    "train-default": {"feature_views": "auto", "epochs_finetune": 3},
    "lite2-train-default": {"feature_views": "auto", "epochs_finetune": 3, "backbone": "tf_efficientnet_lite2"},
    "lite2-default": {"feature_views": "auto", "backbone": "tf_efficientnet_lite2"},
    "train-default-max": {"feature_views": "auto", "epochs_finetune": 3, "pool": "max"},
    "lite2-default-max": {"feature_views": "auto", "backbone": "tf_efficientnet_lite2", "pool": "max"},
    "finetune-sgd": {"head_fit": "sgd", "epochs_finetune": 5},
    "finetune-exact": {"head_fit": "exact", "epochs_finetune": 5},
    "finetune-soup": {"head_fit": "sgd", "epochs_finetune": 5, "soup": 3},  # greedy soup of the best 3 (0275)
    "dihedral-finetune": {**DIHEDRAL, "epochs_finetune": 3},
    # issue 19's options, each alone on top of finetune-sgd (decision 0270)
    "finetune-ema": {"head_fit": "sgd", "epochs_finetune": 5, "ema_decay": 0.998},
    "finetune-llrd": {"head_fit": "sgd", "epochs_finetune": 5, "layer_decay": 0.8},
    "finetune-mixup": {"head_fit": "sgd", "epochs_finetune": 5, "mixup": 0.2},
    "finetune-cutmix": {"head_fit": "sgd", "epochs_finetune": 5, "cutmix": 1.0},
    "finetune-randaug": {"head_fit": "sgd", "epochs_finetune": 5, "augment": "randaugment"},
    "finetune-balanced": {"head_fit": "sgd", "epochs_finetune": 5, "class_balance": "sampler"},
    "finetune-weighted": {"head_fit": "sgd", "epochs_finetune": 5, "class_balance": "weights"},
}
METRICS = ("accuracy", "balanced_accuracy", "auc", "log_loss", "ece", "seconds")
ECE_BINS = 15


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: the confidence-weighted gap between confidence and accuracy over equal-width bins."""
    confidence, right = probs.max(1), probs.argmax(1) == y
    edges = np.minimum((confidence * bins).astype(int), bins - 1)
    return float(sum(abs(right[edges == b].mean() - confidence[edges == b].mean()) * (edges == b).mean()
                     for b in range(bins) if (edges == b).any()))


def scores(y: np.ndarray, probs: np.ndarray, seconds: float) -> dict[str, float]:
    probs = probs / probs.sum(1, keepdims=True)
    auc = roc_auc_score(y, probs[:, 1]) if probs.shape[1] == 2 else roc_auc_score(y, probs, multi_class="ovr")
    return {"accuracy": accuracy_score(y, probs.argmax(1)), "balanced_accuracy": balanced_accuracy_score(
        y, probs.argmax(1)), "auc": auc, "log_loss": log_loss(y, probs, labels=range(probs.shape[1])),
        "ece": expected_calibration_error(y, probs), "seconds": seconds}


def fresh_model(classes: int, options: dict, seed: int) -> Classifier:
    """A new Lite0 classifier (offline weights), its head seeded as `api.train` seeds it."""
    torch.manual_seed(seed)
    options = {"backbone": BACKBONE, "pool": "avg", **options}
    imagenet, _ = create_imagenet_model(get_backbone(options["backbone"]))
    config = resolve_config(None, None, **options)
    return new_classifier(imagenet, task_for([str(c) for c in range(classes)], False, config.binary_logit).outputs,
                          config.head_spec(), config.depths(), config.pool)


def features(model: Classifier, paths: list[str], pre: Preprocess, cache: Path, depths: tuple[int, ...] = (),
             view: int = 0) -> np.ndarray:
    """The cached features of `paths` under symmetry `view` (0: the clean image) for the model with `depths` (the
    model's own are restored)."""
    own, model.depths = model.depths, depths
    try:
        [t] = FeatureExtractor(model, "auto", 32, 2, QUIET, cache).tables(paths, [symmetry_view(pre, False, view)],
                                                                          "features")
        return t.take(np.arange(len(t)))
    finally:
        model.depths = own


def warm_cache(split: Split, cache: Path) -> float:
    """Extract (or find) every image's last-layer and all-level features once, under both poolings; the seconds it
    took."""
    start = time.perf_counter()
    for pool in ("avg", "max"):
        model = fresh_model(len(split.classes), {**split.settings, "pool": pool}, 0)
        pre = Preprocess.for_model(model.backbone, None, split.settings["crop_pct"])
        paths = split.train.paths + split.val.paths + split.test.paths
        for depths in ((), depth_levels(model.backbone)):
            features(model, paths, pre, cache, depths)
    return time.perf_counter() - start


def run_probe(split: Split, cache: Path, seed: int) -> np.ndarray:
    """Test probabilities of the cross-validated logistic regression on the standardised last-layer features."""
    model = fresh_model(len(split.classes), split.settings, seed)
    pre = Preprocess.for_model(model.backbone, None, split.settings["crop_pct"])
    x, test_x = features(model, split.train.paths, pre, cache), features(model, split.test.paths, pre, cache)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=list(C_GRID), cv=folds, max_iter=1000,
                                                                 scoring="accuracy"))
    return probe.fit(x, split.train.targets.numpy()).predict_proba(test_x)


def run_transferkit(split: Split, options: dict, cache: Path, seed: int) -> np.ndarray:
    """Test probabilities of a model trained by transferkit's two stages with `options` (stage 1 only unless they
    fine-tune); a frozen-only model's test features come from the cache, a fine-tuned one's from its backbone."""
    values = {"epochs_finetune": 0, "feature_views": 1, "pool": "avg", **split.settings, **options, "seed": seed,
              "cache_dir": str(cache), "workers": 2}
    config = resolve_config(None, None, **{"backbone": BACKBONE, **values})
    model = fresh_model(len(split.classes), values, seed)
    pre = Preprocess.for_model(model.backbone, config.image_size, config.crop_pct)
    task = task_for(split.classes, False, config.binary_logit)
    Trainer(model, config, task, Compute(torch.device("cpu")), QUIET).fine_tune(split.train, split.val, pre)
    if config.epochs_finetune:
        logits = infer_logits(tta.Averaged(model, config.tta), split.test.paths, eval_transform(pre))
    else:
        logits = torch.stack([frozen_logits(model, split.test.paths, pre, cache, config, k)
                              for k in range(tta.VIEWS[config.tta])]).mean(dim=0)
    return task.probabilities(logits).numpy()


def frozen_logits(model: Classifier, paths: list[str], pre: Preprocess, cache: Path, config, view: int
                  ) -> torch.Tensor:
    """The trained head on the cached features of symmetry `view` of each image (a subset of every level's
    columns when the depths were chosen, so no new extraction)."""
    computed = depth_levels(model.backbone) if config.feature_depths == "auto" else model.depths
    x = features(model, paths, pre, cache, computed, view)
    if computed != model.depths:
        x = x[:, depth_columns(model.backbone, computed, model.depths)]
    with torch.no_grad():
        return model.head.eval()(torch.from_numpy(x))


def row_probabilities(options: dict | list[dict] | None, split: Split, cache: Path, seed: int) -> np.ndarray:
    """A row's test probabilities; an ensemble row (a list of rows' options) averages its members'."""
    if isinstance(options, list):
        return np.mean([row_probabilities(member, split, cache, seed) for member in options], axis=0)
    return run_probe(split, cache, seed) if options is None else run_transferkit(split, options, cache, seed)


def run_row(row: str, options: dict | list[dict] | None, split: Split, cache: Path, seed: int) -> dict[str, float]:
    start = time.perf_counter()
    probs = row_probabilities(options, split, cache, seed)
    return scores(split.test.targets.numpy(), probs, time.perf_counter() - start)


def summary(values: list[float]) -> dict:
    return {"mean": mean(values), "sd": stdev(values) if len(values) > 1 else 0.0, "values": values}


def benchmark(datasets: list[str], rows: dict, seeds: int, cache: Path, quick: bool,
              save: Callable[[dict], None]) -> dict:
    """Every row on every data set and seed; `save` gets the results after each seed (a long run that is stopped
    keeps the seeds it finished)."""
    results: dict = {}
    for name in datasets:
        per_row: dict[str, list[dict]] = {row: [] for row in rows}
        extraction = []
        for seed in range(seeds):
            split = load_split(name, cache, seed, quick)
            extraction.append(warm_cache(split, cache))
            for row, options in rows.items():
                per_row[row].append(run_row(row, options, split, cache, seed))
                print(f"{name} seed {seed} {row}: " + ", ".join(f"{k} {v:.4f}" for k, v in per_row[row][-1].items()),
                      file=sys.stderr, flush=True)
            results[name] = {"n_test": len(split.test.paths), "n_train": len(split.train.paths),
                             "n_val": len(split.val.paths), "seeds": seed + 1, "extraction_seconds": extraction,
                             "rows": {row: {m: summary([r[m] for r in runs]) for m in METRICS}
                                      for row, runs in per_row.items()}}
            save(results)
    return results


def markdown(results: dict) -> list[str]:
    header = ["data", "row", *METRICS]
    lines = []
    for name, result in results.items():
        for row, metrics in result["rows"].items():
            digits = {"seconds": 1}
            lines.append([f"{name} (test n={result['n_test']})", row] + [
                f"{metrics[m]['mean']:.{digits.get(m, 4)}f} ± {metrics[m]['sd']:.{digits.get(m, 4)}f}"
                for m in METRICS])
    return table(header, lines)


def cpu_flags() -> dict:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return {"avx512_vnni": "avx512_vnni" in flags.split(), "avx2": "avx2" in flags.split()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="elpv,fmnist20,fmnist100", help="elpv, food, fmnistK (K per class)")
    parser.add_argument("--seeds", type=int, default=3)
    every = {**ROWS, **FINETUNE_ROWS, **VIEW_ROWS, **SIZE_ROWS}
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(every)}")
    parser.add_argument("--finetune", action="store_true", help="add the fine-tuning rows (slow on CPU)")
    parser.add_argument("--views", action="store_true", help="add rows on 3 feature views (augmented extraction)")
    parser.add_argument("--quick", action="store_true", help="fmnist20, 2 seeds, 50 test images per class")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # scikit-learn's notices of coming API changes
    names = args.rows.split(",") + (list(FINETUNE_ROWS) if args.finetune else []) + (list(VIEW_ROWS) if args.views
                                                                                     else [])
    # a row "a+b+c" is the ensemble of rows a, b and c: their test probabilities averaged
    every.update({n: [every[m] for m in n.split("+")] for n in names if "+" in n and all(
        m in every for m in n.split("+"))})
    unknown = [n for n in names if n not in every]
    if unknown or args.seeds < 2:
        print(f"accuracy.py: unknown rows {unknown} or fewer than 2 seeds", file=sys.stderr)
        return 2
    datasets, seeds = (["fmnist20"], 2) if args.quick else (args.datasets.split(","), args.seeds)
    out = args.out or Path(__file__).parent / "results" / ("accuracy-quick.json" if args.quick else "accuracy.json")
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "machine": {**machine_info(), **cpu_flags()}, "seeds": seeds}
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(results: dict) -> None:
        out.write_text(json.dumps({**record, "results": results}, indent=1) + "\n")

    try:
        results = benchmark(datasets, {n: every[n] for n in dict.fromkeys(names)}, seeds, args.cache_dir, args.quick,
                            save)
    except UserError as exc:
        print(f"accuracy.py: {exc}", file=sys.stderr)
        return 2
    print("\n".join(markdown(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
