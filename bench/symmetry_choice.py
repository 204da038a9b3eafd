"""auto's symmetry check (decision 0292) on the accuracy benchmark's data: for each seeded split, the probe on the
clean view against the probe on the 8 symmetries of each image (Lite0, train+val images, at most auto's 2,000, the
same folds), and whether auto would choose dihedral views. Features come from (and go to) the feature cache.

    cd bench && python symmetry_choice.py --datasets elpv,fmnist20,fmnist100 --out results/symmetry-choice.json

`--pool max` probes max-pooled features, what auto probes since decision 0298 (the default `avg` is what the
first results file measured).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from accuracy import features, fresh_model  # bench/: run as a script, no package
from accuracy_data import load_split
from measure import machine_info

from transferkit.auto.probe import MAX_PROBE_IMAGES, probe_subset
from transferkit.auto.symmetry import judge, paired_fold_accuracies
from transferkit.data.sources import Sample
from transferkit.data.transforms import Preprocess
from transferkit.features.cache import default_cache_dir
from transferkit.models import tta


def decide(name: str, seed: int, folder: Path, cache: Path, pool: str) -> dict:
    split = load_split(name, folder, seed, False)
    everything = [Sample(path, str(label), "train", None) for part in (split.train, split.val)
                  for path, label in zip(part.paths, part.targets.tolist(), strict=True)]
    probed = probe_subset(everything, MAX_PROBE_IMAGES, seed)  # the images auto would probe
    paths, labels = [s.path for s in probed], np.array([int(s.label) for s in probed])
    model = fresh_model(len(split.classes), {**split.settings, "pool": pool}, seed)
    pre = Preprocess.for_model(model.backbone, None, split.settings["crop_pct"])
    start = time.perf_counter()
    views = [features(model, paths, pre, cache, (), k) for k in range(tta.VIEWS["dihedral"])]
    plain, dihedral = paired_fold_accuracies(views, labels, seed)
    chosen, gain, gain_se = judge(plain, dihedral)
    return {"images": len(paths), "clean": float(plain.mean()), "dihedral": float(dihedral.mean()),
            "gain": gain, "gain_se": gain_se, "chosen": chosen, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="elpv,fmnist20,fmnist100")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path("/tmp/transferkit-bench-data"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "symmetry-choice.json")
    parser.add_argument("--pool", choices=("avg", "max"), default="avg", help="how the feature maps are pooled")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results: dict = {"machine": machine_info(), "pool": args.pool, "rows": {}}
    for name in args.datasets.split(","):
        for seed in range(args.seeds):
            row = decide(name, seed, args.data, default_cache_dir(), args.pool)
            results["rows"][f"{name}/{seed}"] = row
            print(f"{name} seed {seed}: clean {row['clean']:.4f}, dihedral {row['dihedral']:.4f}, gain "
                  f"{row['gain']:+.4f} ± {row['gain_se']:.4f} -> {'dihedral' if row['chosen'] else 'clean'}",
                  flush=True)
            args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
