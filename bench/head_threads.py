"""BLAS threads for the frozen stage's solved head and auto's probes (decision 0305): scikit-learn fits of head-sized
problems timed on 1 and on the process's BLAS threads, alternating, on this machine.

Each row is a problem of rows x features x outputs like the ones transferkit solves: the exact head's whole C grid
(`fit_linear`, on features with a learnable signal so that L-BFGS runs as long as on real features) and auto's MLP
probe. Prints a table and writes JSON.

    .venv/bin/python bench/head_threads.py --out bench/results/head-threads.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from statistics import median
from unittest.mock import patch

import numpy as np
from measure import machine_info, table  # bench/: run as a script, no package
from threadpoolctl import threadpool_limits

from transferkit.auto.probe import HIDDEN_UNITS, mlp_probe
from transferkit.cpu import blas_threads, one_blas_thread
from transferkit.training import exact_head

# (rows, features, outputs): a few hundred photos, Fashion-MNIST 100/class, ELPV's 8 views, many classes, a large set
MLP_ITERATIONS = 100  # auto's MLP probe, cut short: per-iteration cost is what the threads change
SIZES = [(250, 1280, 11), (800, 1280, 10), (13648, 1280, 2), (5000, 1280, 50), (20000, 1280, 100)]


def problem(rows: int, features: int, outputs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Max-pooled-like features (non-negative, correlated) whose classes are separable only in part."""
    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % outputs
    centres = rng.standard_normal((outputs, features)) * 0.3
    return np.maximum(rng.standard_normal((rows, features)) + centres[labels], 0).astype(np.float32), labels


def head_seconds(x: np.ndarray, y: np.ndarray, threads: int) -> float:
    """The whole C grid of the exact head on `threads` BLAS threads (its own choice of threads set aside)."""
    split = len(y) * 4 // 5
    with threadpool_limits(limits=threads, user_api="blas"), patch.object(exact_head, "blas_threads_for",
                                                                          lambda *shape: nullcontext()):
        start = time.perf_counter()
        exact_head.fit_linear(x[:split], y[:split], x[split:], y[split:], int(y.max()) + 1)
        return time.perf_counter() - start


def mlp_seconds(x: np.ndarray, y: np.ndarray, threads: int) -> float:
    with threadpool_limits(limits=threads, user_api="blas"):
        start = time.perf_counter()
        mlp_probe(0, MLP_ITERATIONS).fit(x, y)
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "head-threads.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    most = blas_threads()
    rows = []
    for size in SIZES:
        x, y = problem(*size)
        timers = (("exact head (C grid)", head_seconds), (f"MLP probe, {MLP_ITERATIONS} iterations", mlp_seconds))
        for name, timer in timers:
            if name.startswith("MLP") and size[0] > 2000:
                continue  # auto probes at most 2,000 images
            seconds: dict[int, list[float]] = {1: [], most: []}
            for _ in range(args.repeats):
                for threads in dict.fromkeys((1, most)):
                    seconds[threads].append(timer(x, y, threads))
            shape = (size[0], size[1], HIDDEN_UNITS if name.startswith("MLP") else size[2])
            rows.append([name, "x".join(map(str, size)), f"{np.prod(shape, dtype=float):.1e}",
                         f"{median(seconds[1]):.3f}", f"{median(seconds[most]):.3f}",
                         "one" if one_blas_thread(*shape) else "as set"])
    header = ["fit", "rows x features x outputs", "multiply-adds per pass", "1 thread, s", f"{most} threads, s",
              "transferkit uses"]
    print("\n".join(table(header, rows)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine_info(), "blas_threads": most, "header": header, "rows": rows}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
