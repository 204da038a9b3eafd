"""Camera-sized photos: what decoding JPEGs at libjpeg's reduced scales saves (decision 0295).

    .venv/bin/python bench/photos.py                  # 120 photos of 4032 x 3024, 2 repeats
    .venv/bin/python bench/photos.py --images 24 --repeats 1

Rows: decoding one photo in full and at the scale the default input needs (Lite0: short side 256), the dataset
scan that validates every file, a cold frozen-only `train` (each a fresh process, a new cache) and `doctor`
after it. Writes bench/results/photos.json with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import machine_info, make_image, table  # noqa: E402 - bench/ is not a package

from transferkit.data.images import load_rgb  # noqa: E402
from transferkit.data.sources import scan_dataset  # noqa: E402

CAMERA = (4032, 3024)  # a 12-megapixel phone photo
INPUT_SIDE = 256  # Lite0's resize size at its default crop


def write_photos(folder: Path, count: int) -> list[Path]:
    rng, paths = np.random.default_rng(0), []
    for i in range(count):
        label = i % 2
        (folder / f"class_{label}").mkdir(parents=True, exist_ok=True)
        path = folder / f"class_{label}" / f"{i:04d}.jpg"
        make_image(rng, label, 512).resize(CAMERA).save(path, quality=90)
        paths.append(path)
    return paths


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(args: argparse.Namespace, folder: Path) -> dict[str, list[float]]:
    data = folder / "photos"
    photo = write_photos(data, args.images)[0]
    times: dict[str, list[float]] = {"decode_full": [], "decode_scaled": [], "scan": [], "train_cold": [], "doctor": []}
    for repeat in range(args.repeats):
        times["decode_full"].append(timed(partial(load_rgb, photo)))
        times["decode_scaled"].append(timed(partial(load_rgb, photo, reduce_to=INPUT_SIDE)))
        times["scan"].append(timed(partial(scan_dataset, data, 0.2, 0.0, 0)))
        env = {**os.environ, "TRANSFERKIT_CACHE": str(folder / f"cache-{repeat}")}
        command = [sys.executable, "-m", "transferkit", "train", str(data), "--epochs-finetune", "0", "--quiet",
                   "--out", str(folder / f"run-{repeat}")]
        times["train_cold"].append(timed(partial(subprocess.run, command, check=True, env=env, capture_output=True)))
        doctor = [sys.executable, "-m", "transferkit", "doctor", str(data)]  # embeddings cached by the train above
        times["doctor"].append(timed(partial(subprocess.run, doctor, check=True, env=env, capture_output=True)))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "photos.json")
    args = parser.parse_args(argv)
    machine = machine_info()
    with tempfile.TemporaryDirectory() as folder:
        times = measure(args, Path(folder))
    rows = [[name, f"{median(s):.3f}", f"{min(s):.3f}-{max(s):.3f}"] for name, s in times.items()]
    print(f"# {machine['cpu']} ({machine['isa']}), {machine['nproc']} cores; {args.images} photos of "
          f"{CAMERA[0]}x{CAMERA[1]}, {args.repeats} repeats")
    print("\n".join(table(["step", "median s", "range"], rows)))
    args.out.write_text(json.dumps({"machine": {**machine, "load_average_after": os.getloadavg()},
                                    "images": args.images, "size": CAMERA, "seconds": times}, indent=1) + "\n")


if __name__ == "__main__":
    main()
