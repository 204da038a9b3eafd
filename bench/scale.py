"""Scaling benchmark: `transferkit train` in 1 vs N processes (DDP through accelerate; gloo on CPU, nccl on GPUs).

Generates a two-class image folder (bench/speed.py's images), then runs the real command with each process count,
interleaved (1, N, 1, N, ...) so that background load hits both alike, and reports per run:
- extraction img/s: the frozen-backbone features of the training images, cache off (from the run's log line);
- fine-tune img/s: training images per second of the first fine-tuning epoch (history.csv's seconds);
- wall seconds of the whole command.

    .venv/bin/python bench/scale.py                    # 1 vs 2 processes, 1024 images, 2 repeats
    .venv/bin/python bench/scale.py --images 256 --repeats 1 --processes 1 2 4
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import machine_info, make_image  # noqa: E402 - bench/ is not a package

FEATURES_LINE = re.compile(r"features: (\d+) images through the backbone.*?([\d.]+) s\)")


def write_dataset(folder: Path, count: int, size: int = 256) -> int:
    """`count` JPEGs in two class folders; returns how many."""
    rng = np.random.default_rng(0)
    for i in range(count):
        label = i % 2
        target = folder / f"class_{label}"
        target.mkdir(parents=True, exist_ok=True)
        make_image(rng, label, size).save(target / f"{i:06d}.jpg", quality=90)
    return count


def train_once(data: Path, out: Path, processes: int, batch_size: int) -> dict:
    """One `transferkit train` (no cache: extraction is measured every time); its timings."""
    command = [sys.executable, "-m", "transferkit", "train", str(data), "--out", str(out), "--overwrite",
               "--epochs-frozen", "1", "--epochs-finetune", "1", "--augment", "none", "--no-cache",
               "--batch-size", str(batch_size), "--val-split", "0.1", "--num-processes", str(processes)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"train with {processes} processes failed:\n{result.stderr[-2000:]}")
    match = FEATURES_LINE.search(result.stdout + result.stderr)
    with (out / "history.csv").open() as handle:
        finetune = next(row for row in csv.DictReader(handle) if row["stage"] == "finetune")
    n_train = len(json.loads((out / "split.json").read_text())["train"])
    extraction_s = float(match.group(2))
    return {"processes": processes, "wall_s": wall, "extraction_s": extraction_s,
            "extraction_img_s": n_train / extraction_s, "finetune_s": float(finetune["seconds"]),
            "finetune_img_s": n_train / float(finetune["seconds"]), "train_images": n_train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_dataset(data, args.images)
        runs = [train_once(data, Path(tmp) / f"run{p}", p, args.batch_size)
                for _ in range(args.repeats) for p in args.processes]
    rows = []
    for p in args.processes:
        mine = [r for r in runs if r["processes"] == p]
        rows.append({"processes": p, **{key: median(r[key] for r in mine)
                                        for key in ("wall_s", "extraction_img_s", "finetune_img_s")},
                     "runs": mine})
    base = rows[0]
    print(f"| processes | extraction img/s | fine-tune img/s | wall s | vs {base['processes']} process |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} | {row['extraction_img_s']:.1f} | {row['finetune_img_s']:.1f} | "
              f"{row['wall_s']:.1f} | {base['wall_s'] / row['wall_s']:.2f}x |")
    machine = {**machine_info(), "load_after": os.getloadavg()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "images": args.images, "batch_per_process": args.batch_size,
                                     "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
