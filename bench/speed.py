"""Speed benchmark: transferkit's defaults against the loops the tutorials write, side by side in one run.

CPU only, EfficientNet-Lite0 at 224 px, on generated images (two learnable classes: ellipses vs rectangles), so it
needs neither a data set nor the network. Variants that do the same work are timed interleaved (a, b, a, b, ...),
so a noisy shared machine slows them alike: read the ratios, not the absolute numbers.

    .venv/bin/python bench/speed.py            # 512 images, scaling at 1000, 10000 and 50000 images
    .venv/bin/python bench/speed.py --quick    # smoke test with tiny sizes
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from statistics import median

import numpy as np
import onnxruntime
import torch
from measure import cpu_seconds, machine_info, peak_rss_mb, table, write_images  # bench/: run as a script, no package

from transferkit.data.loader import ImageDataset, make_loader
from transferkit.data.transforms import Preprocess, eval_transform
from transferkit.export.onnx import export_onnx, quantize_int8
from transferkit.features.extract import ENGINE_NAMES, FeatureExtractor, View, feature_engine
from transferkit.models.classifier import HeadSpec, freeze_backbone, new_classifier, set_train_mode, unfreeze
from transferkit.models.registry import create_imagenet_model, get_backbone
from transferkit.progress import Reporter
from transferkit.task.kinds import Binary
from transferkit.training.prefix import with_frozen_prefix

BACKBONE = "tf_efficientnet_lite0"
BATCH = 32
HEAD_EPOCHS = 20
QUIET = Reporter(quiet=True)
TASK = Binary(["0", "1"])
CRITERION = TASK.loss()
FINETUNE_VARIANTS = {
    "plain": "eager fp32 NCHW, all layers trainable, BN train mode",
    "channels_last": "channels_last, all layers trainable, BN train mode",
    "top3": "channels_last, unfreeze 3 blocks, BN inference mode, all in PyTorch",
    "transferkit": "channels_last, unfreeze 3 blocks, BN inference mode, frozen blocks on the feature engine",
}


def build_model() -> tuple[torch.nn.Module, Callable]:
    """A fresh Lite0 classifier (offline ImageNet weights, one binary logit) and its eval preprocessing."""
    imagenet, _ = create_imagenet_model(get_backbone(BACKBONE))
    transform = eval_transform(Preprocess.from_timm_config(imagenet.pretrained_cfg))
    torch.manual_seed(0)  # every copy gets the same head
    return new_classifier(imagenet, 1, HeadSpec()), transform


def interleaved(jobs: dict[str, Callable[[], object]], repeats: int, warmup: int = 0):
    """Run the jobs round-robin so that background load hits every variant alike; returns the seconds and the
    result of each run after the warm-up rounds."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    results: dict[str, list] = {name: [] for name in jobs}
    for round_ in range(warmup + repeats):
        for name, job in jobs.items():
            start = time.perf_counter()
            result = job()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
                results[name].append(result)
    return times, results


def row(section: str, variant: str, runs: list[float], images: int | None, baseline: list[float], note: str = ""):
    """A table row from the seconds of each run; the spread goes into the JSON and the table with the median."""
    seconds = median(runs)
    return {"section": section, "variant": variant, "seconds": seconds, "runs": runs, "note": note,
            "img_per_s": images / seconds if images else None, "speedup": median(baseline) / seconds}


def plain_loader(paths: list[str], labels: list[int] | None, transform: Callable, shuffle: bool = False):
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist() if shuffle else None
    return make_loader(ImageDataset(paths, labels, transform), BATCH, 0, order)


def plain_features(model: torch.nn.Module, loader, step: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop a tutorial writes: eager fp32 NCHW under no_grad, images decoded in the main process; `step`
    (a head update) runs on each batch's features, as in recompute-every-epoch training."""
    model.eval()
    features, targets = [], []
    for images, labels in loader:
        with torch.no_grad():
            batch = model.embed(images)
        if step is not None:
            step(batch, labels)
        features.append(batch)
        targets.append(labels)
    return torch.cat(features), torch.cat(targets)


def tk_features(model: torch.nn.Module, paths: list[str], transform: Callable, engine: str = "auto"
                ) -> tuple[torch.Tensor, float]:
    """transferkit's extractor as stage 1 uses it, cache off, and the seconds its engine took to set up; a new one
    each call, so the ONNX export, compilation and parity check are paid every time (as once per training run)."""
    extractor = FeatureExtractor(model, engine, BATCH, 2, QUIET, cache_root=None)
    return extractor(paths, [View(0, transform, {})], "bench")[0], extractor.setup_seconds


def bench_extraction(model, paths: list[str], transform: Callable, repeats: int) -> list[dict]:
    """Plain loop vs transferkit's default engine (OpenVINO) and ONNX Runtime. The transferkit times include the
    engine's set-up (paid once per run, whatever the image count); the notes give the rate without it too."""
    loader = plain_loader(paths, None, transform)
    jobs = {"plain": lambda: (plain_features(model, loader)[0], 0.0),
            "onnx": lambda: tk_features(model, paths, transform, "onnx"),
            "openvino": lambda: tk_features(model, paths, transform, "openvino")}
    times, out = interleaved(jobs, repeats)
    plain, base = out["plain"][-1][0], times["plain"]
    section = f"1. extraction, {len(paths)} files (median of {repeats})"
    rows = [row(section, "plain: eager fp32 NCHW, 0 workers, batch 32, no_grad", base, len(paths), base,
                f"features max abs {float(plain.abs().max()):.1f}")]
    for engine in ("onnx", "openvino"):
        setups = [setup for _, setup in out[engine]]
        steady = median(len(paths) / (seconds - setup) for seconds, setup in zip(times[engine], setups, strict=True))
        diff = float((plain - out[engine][-1][0]).abs().max())
        rows.append(row(section, f"transferkit: FeatureExtractor, {ENGINE_NAMES[engine]}, 2 workers, batch 32, "
                        "no cache", times[engine], len(paths), base,
                        f"max abs feature diff vs plain {diff:.1e}; incl. set-up {median(setups):.1f}s "
                        f"(export, compile, parity check); without it {steady:.1f} img/s"))
        rows[-1]["steady_img_per_s"] = steady
    return rows


def new_head(model) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A copy of the classifier's untrained head (one linear layer) with transferkit's default AdamW: both stage-1
    variants start from the same weights."""
    head = copy.deepcopy(model.head)
    return head, torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)


def train_step(module: torch.nn.Module, optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    loss = CRITERION(module(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_head(head, optimizer, features: torch.Tensor, targets: torch.Tensor, epochs: int) -> None:
    order = torch.Generator().manual_seed(2)
    for _ in range(epochs):
        for chunk in torch.randperm(len(targets), generator=order).split(BATCH):
            train_step(head, optimizer, features[chunk], targets[chunk])


def accuracy(head, features: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return float((TASK.predicted(head(features)) == targets).float().mean())


def tutorial_stage1(model, train, val, transform: Callable) -> tuple[float, float]:
    """Recompute every epoch: each epoch pushes every train and val image through the frozen base. One epoch is
    timed; the other 19 would push the same pixels through the same frozen net (no augmentation here) and get the
    same features, so they run on epoch 1's features for the accuracy and are costed at epoch 1's time."""
    head, optimizer = new_head(model)
    start = time.perf_counter()
    loader = plain_loader(*train, transform, shuffle=True)
    features, targets = plain_features(model, loader, partial(train_step, head, optimizer))
    val_features, val_targets = plain_features(model, plain_loader(*val, transform))
    epoch = time.perf_counter() - start
    train_head(head, optimizer, features, targets, HEAD_EPOCHS - 1)
    return epoch * HEAD_EPOCHS, accuracy(head, val_features, val_targets)


def transferkit_stage1(model, train, val, transform: Callable) -> tuple[float, float]:
    """Features of train and val once, then every head epoch on the feature tensor."""
    head, optimizer = new_head(model)
    start = time.perf_counter()
    features, _ = tk_features(model, train[0] + val[0], transform)
    n = len(train[0])
    train_head(head, optimizer, features[:n], torch.tensor(train[1]), HEAD_EPOCHS)
    seconds = time.perf_counter() - start
    return seconds, accuracy(head, features[n:], torch.tensor(val[1]))


def bench_stage1(model, paths: list[str], labels: list[int], transform: Callable, repeats: int) -> list[dict]:
    cut = len(paths) * 3 // 4  # the last quarter is held out, balanced because the classes alternate
    train, val = (paths[:cut], labels[:cut]), (paths[cut:], labels[cut:])
    jobs = {name: partial(job, model, train, val, transform)
            for name, job in (("plain", tutorial_stage1), ("tk", transferkit_stage1))}
    _, out = interleaved(jobs, repeats)  # each job times itself: the plain one leaves out its 19 cheap epochs
    (plain_s, plain_acc), (tk_s, tk_acc) = (([s for s, _ in out[n]], out[n][-1][1]) for n in ("plain", "tk"))
    section = f"2. stage 1, {HEAD_EPOCHS} head epochs, {len(train[0])} train + {len(val[0])} val (median of {repeats})"
    return [row(section, "plain: recompute the frozen forward every epoch (extrapolated: 20 x 1 measured epoch, "
                "cost per epoch is constant)", plain_s, None, plain_s, f"val acc {plain_acc:.3f}"),
            row(section, "transferkit: extract once + 20 epochs on the feature tensor (AdamW, linear head)",
                tk_s, None, plain_s, f"val acc {tk_acc:.3f}")]


def finetune_job(variant: str, images: torch.Tensor, targets: torch.Tensor) -> tuple[Callable, int]:
    """One training step of a fresh classifier set up as `variant`; also the number of trainable parameters."""
    model, _ = build_model()
    if variant in ("top3", "transferkit"):
        freeze_backbone(model)
        unfreeze(model, "3")
        set_train_mode(model, train_backbone_bn=False)
    else:
        unfreeze(model, "all")
        model.train()
    if variant != "plain":
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    module = with_frozen_prefix(model, "auto", QUIET) if variant == "transferkit" else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    return partial(train_step, module, optimizer, images, targets), sum(p.numel() for p in params)


def bench_finetune(images: torch.Tensor, targets: torch.Tensor, steps: int) -> list[dict]:
    built = {variant: finetune_job(variant, images, targets) for variant in FINETUNE_VARIANTS}
    times, _ = interleaved({variant: step for variant, (step, _) in built.items()}, steps, warmup=1)
    section = f"3. fine-tune step, batch {len(images)} (median of {steps} after 1 warm-up)"
    return [row(section, f"{variant}: {text}", times[variant], len(images), times["plain"],
                f"{built[variant][1] / 1e6:.2f}M trainable params") for variant, text in FINETUNE_VARIANTS.items()]


class Logits(torch.nn.Module):
    """The classifier under the attribute and input names `transferkit export` gives it, so quantize_int8 keeps the
    same nodes in float as it does for a run's export."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)


def int8_engine(model: torch.nn.Module, images: torch.Tensor, folder: Path) -> Callable[[], np.ndarray]:
    """The classifier as `transferkit export --int8` builds it (static QDQ int8, calibrated on `images`)."""
    fp32, int8 = folder / "logits.onnx", folder / "logits.int8.onnx"
    export_onnx(Logits(model).eval(), images[:1], fp32)
    quantize_int8(fp32, int8, images)
    session = onnxruntime.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"pixels": images.numpy()})[0]


def logits_of(model, features_of: Callable, images: torch.Tensor) -> torch.Tensor:
    return model.head(features_of(images))


def bench_inference(model, images: torch.Tensor, repeats: int, folder: Path) -> list[dict]:
    """Whole-classifier logits for one batch: eager PyTorch, the ONNX Runtime and OpenVINO feature engines (+ the
    eager linear head), and the int8 export that `predict`/`serve` prefer when the run has one."""
    model.eval()
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    engines, setups = {}, {}
    for name in ("onnx", "openvino"):
        start = time.perf_counter()
        engines[name], _ = feature_engine(model, images, name, QUIET)
        setups[name] = time.perf_counter() - start
    int8 = int8_engine(model, images, folder)
    jobs = {"plain": partial(model, images),
            "channels_last": partial(fast, images.contiguous(memory_format=torch.channels_last)),
            **{name: partial(logits_of, model, run, images) for name, run in engines.items()},
            "int8": int8}
    with torch.no_grad():
        times, out = interleaved(jobs, repeats, warmup=1)
    plain = out["plain"][-1]
    agree = float(((plain[:, 0] > 0).numpy() == (out["int8"][-1][:, 0] > 0)).mean())
    base = times["plain"]
    section = f"4. inference, batch {len(images)} tensors (median of {repeats})"
    return [row(section, "plain: eager fp32 NCHW, no_grad", base, len(images), base),
            row(section, "eager channels_last, no_grad", times["channels_last"], len(images), base),
            *[row(section, f"transferkit feature engine ({ENGINE_NAMES[name]}) + head", times[name], len(images),
                  base, f"max abs logit diff vs plain {float((plain - out[name][-1]).abs().max()):.1e}; engine "
                  f"set-up (export, compile, parity check) {setups[name]:.1f}s") for name in engines],
            row(section, "transferkit int8 export (ONNX Runtime, static QDQ)", times["int8"], len(images), base,
                f"top-1 agreement with plain {agree:.1%} on this batch")]


def scale_worker(folder: str, count: int) -> None:
    """Child process of the scaling row: extract `count` images as stage 1 does (streamed into a fresh feature
    cache, read back a batch at a time), print one JSON line."""
    paths = sorted(str(p) for p in Path(folder).glob("*.png"))[:count]
    model, transform = build_model()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="transferkit-bench-cache-") as cache:
        extractor = FeatureExtractor(model, "auto", BATCH, 2, QUIET, cache_root=Path(cache))
        [table] = extractor.tables(paths, [View(0, transform, {})], "bench")
        for start_row in range(0, len(table), BATCH):  # one pass over the rows, as a head-training epoch reads them
            table.take(np.arange(start_row, min(start_row + BATCH, len(table))))
    seconds = time.perf_counter() - start
    print(json.dumps({"images": len(paths), "seconds": seconds, "img_per_s": len(paths) / seconds,
                      "peak_rss_mb": peak_rss_mb()}))


def bench_scaling(scales: list[int], folder: Path) -> dict:
    start = time.perf_counter()
    write_images(folder, max(scales), 64, ".png")
    results = {"generate_seconds": time.perf_counter() - start, "runs": []}
    for count in scales:
        # One process per count: ru_maxrss only grows, so a shared process would report the largest peak for all.
        command = [sys.executable, str(Path(__file__).resolve()), "--scale-worker", str(count), "--folder", str(folder)]
        out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        results["runs"].append(json.loads(out.strip().splitlines()[-1]))
    return results


def markdown(results: dict) -> str:
    m = results["machine"]
    load = " -> ".join("/".join(f"{x:.1f}" for x in m[k]) for k in ("load_average_before", "load_average_after"))
    lines = [f"Machine: nproc {m['nproc']}, {m['cpu']} ({m['isa']}), torch {m['torch']} "
             f"({m['torch_threads']} threads), "
             f"onnxruntime {m['onnxruntime']}, openvino {m.get('openvino', '-')}, timm {m['timm']}; {BACKBONE} "
             f"at 224 px. Shared machine: other processes "
             f"kept {m['other_processes_cores']:.1f} of {m['nproc']} cores busy on average during the run (load "
             f"average before -> after {load}). Wall time {results['wall_seconds']:.0f}s."]
    lines += table(["Measurement", "Variant", "Seconds: median (min-max)", "img/s", "Speed-up vs plain", "Notes"], [
        [r["section"], r["variant"], f"{r['seconds']:.2f} ({min(r['runs']):.1f}-{max(r['runs']):.1f})",
         f"{r['img_per_s']:.1f}" if r["img_per_s"] else "-", f"{r['speedup']:.2f}x", r["note"]] for r in results["rows"]
    ])
    lines += table(["Peak RSS after phase (MB, never decreases)", "This process", "Largest child (loader worker)"],
                   [[phase, f"{v['self']:.0f}", f"{v['children']:.0f}"] for phase, v in results["peak_rss_mb"].items()])
    if scaling := results.get("scaling"):
        lines += ["", "Scaling of transferkit extraction (default engine: OpenVINO, 2 workers, streamed into a fresh "
                  "feature cache and read back once) on 64x64 PNG files, resized to 256 and centre-cropped to 224 by "
                  "the pipeline; "
                  "one process per count, time includes the engine's set-up (generating the files took "
                  f"{scaling['generate_seconds']:.0f}s):"]
        lines += table(["Images", "Seconds", "img/s", "Peak RSS, process (MB)", "Peak RSS, largest worker (MB)"], [
            [r["images"], f"{r['seconds']:.1f}", f"{r['img_per_s']:.1f}", f"{r['peak_rss_mb']['self']:.0f}",
             f"{r['peak_rss_mb']['children']:.0f}"] for r in scaling["runs"]])
    return "\n".join(lines)


def run_all(args: argparse.Namespace, folder: Path) -> dict:
    results: dict = {"machine": machine_info(), "rows": [], "peak_rss_mb": {}}
    paths, labels = write_images(folder / "main", args.images, 256, ".jpg")
    model, transform = build_model()
    freeze_backbone(model)
    images, targets = next(iter(plain_loader(paths[:BATCH], labels[:BATCH], transform)))
    # First calls pay one-off costs (lazy imports such as torch.onnx, oneDNN kernel set-up) that later runs do not.
    plain_features(model, plain_loader(paths[:BATCH], None, transform))
    tk_features(model, paths[:BATCH], transform)
    phases = {
        "1. extraction": lambda: bench_extraction(model, paths, transform, args.repeats),
        "2. stage 1": lambda: bench_stage1(model, paths, labels, transform, args.repeats),
        "3. fine-tune step": lambda: bench_finetune(images, targets, args.steps),
        "4. inference": lambda: bench_inference(model, images, args.steps * 2, folder),
    }
    for phase, bench in phases.items():
        results["rows"] += bench()
        results["peak_rss_mb"][phase] = peak_rss_mb()
    if args.scales:
        results["scaling"] = bench_scaling(args.scales, folder / "scaling")
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="generated 256x256 JPEGs for rows 1-2")
    parser.add_argument("--scales", default="1000,10000,50000", help="image counts for the scaling table ('' to skip)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of rows 1-2 (median)")
    parser.add_argument("--steps", type=int, default=5, help="timed fine-tune steps (inference: twice as many)")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/speed.json, speed-quick.json)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of this script")
    parser.add_argument("--scale-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.scales, args.repeats, args.steps = 32, "32,64", 1, 1
    args.scales = [int(s) for s in args.scales.split(",") if s.strip()]
    args.out = args.out or Path("bench/results/speed-quick.json" if args.quick else "bench/results/speed.json")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.scale_worker:
        return scale_worker(args.folder, args.scale_worker)
    start, (busy, own) = time.perf_counter(), cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="transferkit-bench-") as folder:
        results = run_all(args, Path(folder))
    wall, (busy_end, own_end) = time.perf_counter() - start, cpu_seconds()
    others = max(0.0, (busy_end - busy) - (own_end - own)) / wall
    results["machine"].update(load_average_after=os.getloadavg(), other_processes_cores=others)
    results["wall_seconds"] = wall
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results["args"] = {**vars(args), "out": str(args.out)}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
