"""Same seed, same result: a frozen-only `train` of generated images with the code of two source trees, compared.

    .venv/bin/python bench/same_result.py /work/main /work/wt20            # 500 images, 20 head epochs
    .venv/bin/python bench/same_result.py A B --images 120 --set feature_views=3

Each tree trains in its own process (PYTHONPATH=TREE) into its own run folder with its own, empty feature cache.
Prints whether model.safetensors is bit-identical and which metrics.json / meta.json entries differ (wall times,
dates and paths are left out), and exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import write_images  # noqa: E402 - bench/ is not a package

NOT_COMPARED = {"seconds_per_image", "created", "transferkit_version", "weights_source", "skipped_files",
                "tta_selection"}


def train(tree: str, data: Path, out: Path, cache: Path, sets: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": tree, "TRANSFERKIT_CACHE": str(cache)}
    extra = [arg for s in sets for arg in ("--set", s)]
    subprocess.run([sys.executable, "-m", "transferkit", "train", str(data), "--epochs-frozen", "20",
                    "--epochs-finetune", "0", "--quiet", "--out", str(out), *extra], check=True, env=env)


def differences(a: dict, b: dict) -> list[str]:
    return [key for key in sorted(set(a) | set(b)) if key not in NOT_COMPARED and a.get(key) != b.get(key)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--set", action="append", default=[], help="a TrainConfig key=value for both runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        paths, labels = write_images(root / "data" / "images", args.images, 256, ".jpg")
        for path, label in zip(paths, labels, strict=True):  # class folders, as a user's photos
            (root / "data" / f"class_{label}").mkdir(exist_ok=True)
            Path(path).rename(root / "data" / f"class_{label}" / Path(path).name)
        (root / "data" / "images").rmdir()
        runs = [root / f"run{i}" for i in (0, 1)]
        for i, tree in enumerate(args.trees):
            train(tree, root / "data", runs[i], root / f"cache{i}", args.set)
        weights_same = (runs[0] / "model.safetensors").read_bytes() == (runs[1] / "model.safetensors").read_bytes()
        found = {name: differences(*(json.loads((run / name).read_text()) for run in runs))
                 for name in ("metrics.json", "meta.json")}
        metrics = json.loads((runs[1] / "metrics.json").read_text())
    print(f"{args.images} images, --set {args.set}: model.safetensors identical: {weights_same}; "
          f"differing entries: {found}; accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.6f}")
    return 0 if weights_same and not any(found.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
