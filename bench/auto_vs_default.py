"""`transferkit auto --time-budget B` against `transferkit train` with its defaults on the demo data (ELPV), as a
user runs them (each a fresh process, each seed its own split, a cold feature cache per run), over several seeds.

Both read the demo's cells as a CSV (`transferkit.demo.write_elpv_csv`) with the demo's split fractions (15 % val,
20 % test) and its preprocessing (`crop_pct: 1.0`: the cell fills the image); everything else is each command's
default. Prints a table and writes JSON: test accuracy, balanced accuracy, AUC, the backbone auto chose and seconds.

    .venv/bin/python bench/auto_vs_default.py --seeds 0,1,2 --out bench/results/auto-vs-default.json
    .venv/bin/python bench/auto_vs_default.py --seeds 0 --time-budget 5      # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, stdev

from transferkit.demo import write_elpv_csv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import machine_info  # noqa: E402 - bench/ is not a package

METRICS = ("accuracy", "balanced_accuracy", "auc")


def run(command: str, data: Path, out: Path, seed: int, extra: list[str], folder: Path) -> dict:
    """One command's test metrics, the backbone it trained and its wall seconds."""
    argv = [sys.executable, "-m", "transferkit", command, str(data), "--out", str(out), "--seed", str(seed),
            "--val-split", "0.15", "--test-split", "0.2", "--config", str(folder / "crop.yaml"),
            "--cache-dir", str(folder / f"cache-{command}-{seed}"), "--quiet", *extra]
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    chosen = json.loads((out / "auto.json").read_text()) if command == "auto" else {}
    return {**{name: metrics[name] for name in METRICS}, "n": metrics["n"], "split": metrics["split"],
            "backbone": meta.get("backbone"), "tta": meta.get("tta"), "symmetry": chosen.get("symmetry"),
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--time-budget", type=float, default=30.0, help="auto's budget in minutes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "auto-vs-default.json")
    args = parser.parse_args()
    results: dict = {"machine": machine_info(), "time_budget": args.time_budget, "runs": []}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "crop.yaml").write_text("crop_pct: 1.0\n")
        data = write_elpv_csv(folder / "elpv.csv")
        for seed in (int(s) for s in args.seeds.split(",")):
            for command, extra in (("train", []), ("auto", ["--time-budget", str(args.time_budget)])):
                row = run(command, data, folder / f"{command}-{seed}", seed, extra, folder)
                results["runs"].append({"command": command, "seed": seed, **row})
                print(json.dumps(results["runs"][-1]), flush=True)
                args.out.write_text(json.dumps(results, indent=2))
    for command in ("train", "auto"):
        rows = [r for r in results["runs"] if r["command"] == command]
        cells = [f"{mean(r[m] for r in rows):.4f} ± {stdev(r[m] for r in rows) if len(rows) > 1 else 0:.4f}"
                 for m in (*METRICS, "seconds")]
        print(f"| {command} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
