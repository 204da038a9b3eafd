"""`transferkit auto --time-budget B` against `transferkit train` with its defaults, as a user runs them (each a
fresh process, each seed its own split, a cold feature cache per run), over several seeds.

- `--data elpv` (the demo's data): both read the demo's cells as a CSV (`transferkit.demo.write_elpv_csv`) with the
  demo's split fractions (15 % val, 20 % test) and its preprocessing (`crop_pct: 1.0`: the cell fills the image).
- `--data food`: the food photos of `bench/accuracy_data.py` (distinct pictures, one folder per food group), split
  20 % val, 20 % test.

Everything else is each command's default. Prints a table and writes JSON: test accuracy, balanced accuracy, AUC,
the backbone auto chose and seconds.

    .venv/bin/python bench/auto_vs_default.py --seeds 0,1,2 --out bench/results/auto-vs-default.json
    .venv/bin/python bench/auto_vs_default.py --seeds 0 --time-budget 5      # a quick look
    .venv/bin/python bench/auto_vs_default.py --data food --seeds 0,1,2,3,4 --time-budget 5
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
from transferkit.features.cache import default_cache_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_data import FOOD_SPLIT, food_folder  # noqa: E402 - bench/ is not a package
from measure import machine_info  # noqa: E402

METRICS = ("accuracy", "balanced_accuracy", "auc")


def data_and_flags(name: str, folder: Path) -> tuple[Path, list[str], str]:
    """The data set's path, the flags both commands read it with and the configuration (YAML) both train with."""
    if name == "elpv":
        return write_elpv_csv(folder / "elpv.csv"), ["--val-split", "0.15", "--test-split", "0.2"], "crop_pct: 1.0\n"
    return food_folder(default_cache_dir() / "food"), ["--val-split", str(FOOD_SPLIT["val_split"]),
                                                       "--test-split", str(FOOD_SPLIT["test_split"])], ""


def config_flags(text: str, path: Path) -> list[str]:
    if not text:
        return []
    path.write_text(text)
    return ["--config", str(path)]


def run(command: str, data: Path, out: Path, seed: int, extra: list[str], folder: Path) -> dict:
    """One command's test metrics, the backbone it trained and its wall seconds."""
    argv = [sys.executable, "-m", "transferkit", command, str(data), "--out", str(out), "--seed", str(seed),
            "--cache-dir", str(folder / f"cache-{command}-{seed}"), "--quiet", *extra]
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    chosen = json.loads((out / "auto.json").read_text()) if command == "auto" else {}
    return {**{name: metrics[name] for name in METRICS}, "n": metrics["n"], "split": metrics["split"],
            "backbone": meta.get("backbone"), "tta": meta.get("tta"), "symmetry": chosen.get("symmetry"),
            "ensemble": [m["backbone"] for m in meta.get("ensemble", {}).get("members", [])],
            "race": chosen.get("race"), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("elpv", "food"), default="elpv")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--auto-config", default="", help="YAML lines auto alone gets, e.g. 'ensemble: true'")
    parser.add_argument("--time-budget", type=float, default=30.0, help="auto's budget in minutes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "auto-vs-default.json")
    args = parser.parse_args()
    results: dict = {"machine": machine_info(), "data": args.data, "time_budget": args.time_budget,
                     "auto_config": args.auto_config, "runs": []}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        data, flags, shared = data_and_flags(args.data, folder)
        train_flags = [*flags, *config_flags(shared, folder / "train.yaml")]
        auto_flags = [*flags, *config_flags(shared + args.auto_config.replace("\\n", "\n"), folder / "auto.yaml"),
                      "--time-budget", str(args.time_budget)]
        for seed in (int(s) for s in args.seeds.split(",")):
            for command, extra in (("train", train_flags), ("auto", auto_flags)):
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
