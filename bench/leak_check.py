"""What the leak check (held-out images byte-identical to training images) adds to every `train` and `evaluate`:
content digests of the training and evaluated files, grouped as doctor groups exact duplicates.

    .venv/bin/python bench/leak_check.py [--repeats 5] [--out bench/results/leak_check.json]

Runs on ELPV's 2,624 PNGs (the elpv-dataset package), split 80/20 as train does by default. The modules train and
evaluate have loaded already are imported first, so only the check itself is timed (the page cache is warm after
the first repeat; the first is reported on its own).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import elpv_dataset

import transferkit.doctor.checks  # noqa: F401 - loaded by the check on first use; not what is measured
import transferkit.runs.run  # noqa: F401 - loaded by train and evaluate already
from transferkit.runs.scope import leaked_rows


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text()
    name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
    return f"{name}, avx512_vnni {'yes' if 'avx512_vnni' in info else 'no'}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/leak_check.json")
    args = parser.parse_args()
    paths = sorted(str(p) for p in (Path(elpv_dataset.__file__).parent / "data" / "images").glob("*.png"))
    cut = int(0.8 * len(paths))
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        leaked = leaked_rows(paths[cut:], paths[:cut])
        seconds.append(time.perf_counter() - start)
    result = {"images": len(paths), "mib": round(sum(os.path.getsize(p) for p in paths) / 2**20, 1),
              "leaked": len(leaked), "first_s": round(seconds[0], 3), "median_s": round(statistics.median(seconds), 3),
              "seconds": [round(s, 3) for s in seconds], "cpu": cpu_name()}
    print("| images | MiB | first (s) | median (s) | CPU |\n|---|---|---|---|---|")
    print(f"| {result['images']} | {result['mib']} | {result['first_s']} | {result['median_s']} | {result['cpu']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
