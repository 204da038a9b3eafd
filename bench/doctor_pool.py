"""Do doctor's thresholds hold for max-pooled embeddings as for average-pooled ones (decisions 0223, 0302)?

1. Near duplicates (cosine 0.95): scikit-image's photos at twice their size, against their JPEG re-encodes,
   brightened and shrunk copies (all should score at or above 0.95), the other photos and the four tiles of each
   photo (all should score below it).
2. Likely mislabeled (a logistic regression on L2-normalised embeddings, `--mislabel-c` its C values, cleanlab): 5 %
   of the labels flipped at random (3 seeds) on the benchmark data sets of `accuracy_data.py`; how many flips are
   found, how many other images are flagged.

    cd bench && ../.venv/bin/python doctor_pool.py --datasets food,fmnist20,elpv --out results/doctor-pool.json
    cd bench && ../.venv/bin/python doctor_pool.py --pools max --mislabel-c 10,100 --out results/doctor-mislabel-c.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image, ImageEnhance

from transferkit.data.transforms import Preprocess, eval_transform
from transferkit.doctor.mislabel import INVERSE_REGULARISATION, label_issues, out_of_fold_probabilities
from transferkit.features.cache import default_cache_dir
from transferkit.models.pretrained import load_backbone

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import features, fresh_model  # noqa: E402 - bench/ is not a package
from accuracy_data import load_split  # noqa: E402
from measure import machine_info  # noqa: E402

POOLS = ("avg", "max")
# scikit-image's bundled colour and grey photos (no download); "cat" is "chelsea" again, so it is left out
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "logo", "page", "camera", "moon", "coins", "horse", "text", "clock", "brick", "grass",
          "gravel")
FLIPPED_SHARE = 0.05


def photos() -> list[Image.Image]:
    images = []
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        image = Image.fromarray(array.astype(np.uint8) * (255 if array.dtype == bool else 1)).convert("RGB")
        images.append(image.resize((image.width * 2, image.height * 2)))
    return images


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def scaled(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((int(image.width * factor), int(image.height * factor)))


def tiles(image: Image.Image) -> list[Image.Image]:
    w, h = image.width // 2, image.height // 2
    return [image.crop((x, y, x + w, y + h)) for x in (0, w) for y in (0, h)]


COPIES = {
    "jpeg 75": lambda image: jpeg(image, 75),
    "jpeg 90": lambda image: jpeg(image, 90),
    "brightness x1.1": lambda image: ImageEnhance.Brightness(image).enhance(1.1),
    "size x0.75": lambda image: scaled(image, 0.75),
    "size x0.5": lambda image: scaled(image, 0.5),
    "size x0.5, jpeg 90": lambda image: jpeg(scaled(image, 0.5), 90),
}


def near_duplicate_scores(pool: str) -> dict:
    """The lowest cosine of each kind of copy, the highest of distinct photos and of a photo's tiles."""
    backbone = load_backbone("tf_efficientnet_lite0", None, pool=pool)
    transform, model = eval_transform(backbone.pre), backbone.model.eval()

    def unit(images: list[Image.Image]) -> np.ndarray:
        with torch.no_grad():
            v = model.embed(torch.stack([transform(i) for i in images])).numpy()
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    images = photos()
    originals = unit(images)
    others = originals @ originals.T
    np.fill_diagonal(others, -1.0)
    tile_scores = []
    for image in images:
        parts = unit(tiles(image))
        pairs = parts @ parts.T
        np.fill_diagonal(pairs, -1.0)
        tile_scores.append(float(pairs.max()))
    copies = {name: float((unit([edit(i) for i in images]) * originals).sum(axis=1).min()) for name, edit in
              COPIES.items()}
    return {"lowest_copy": copies, "highest_distinct": float(others.max()), "highest_tiles": max(tile_scores)}


def planted_flips(name: str, pool: str, cache: Path, seeds: int, inverse_regularisation: float) -> dict:
    """Recall of flipped labels and other images flagged, by cleanlab on doctor's out-of-fold probabilities."""
    split = load_split(name, cache, 0, False)
    paths = split.train.paths + split.val.paths + split.test.paths
    labels = np.concatenate([part.targets.numpy() for part in (split.train, split.val, split.test)])
    classes = len(split.classes)
    model = fresh_model(classes, {**split.settings, "pool": pool}, 0)
    vectors = features(model, paths, Preprocess.for_model(model.backbone, None, split.settings["crop_pct"]), cache)
    recall, others = [], []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        flipped = rng.choice(len(labels), int(FLIPPED_SHARE * len(labels)), replace=False)
        noisy = labels.copy()
        noisy[flipped] = (labels[flipped] + rng.integers(1, classes, len(flipped))) % classes
        probs = out_of_fold_probabilities(vectors, noisy, seed, inverse_regularisation)
        flagged = {row for row, _ in label_issues(probs, noisy)}
        recall.append(len(flagged & set(flipped)) / len(flipped))
        others.append(len(flagged - set(flipped)))
    return {"images": len(labels), "flipped": int(FLIPPED_SHARE * len(labels)), "recall": recall,
            "other_flagged": others}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="food,fmnist20,elpv")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pools", default=",".join(POOLS))
    parser.add_argument("--mislabel-c", default=str(INVERSE_REGULARISATION),
                        help="the mislabel model's C values to compare, e.g. 10,100")
    parser.add_argument("--out", type=Path, default=Path("results/doctor-pool.json"))
    args = parser.parse_args()
    cache = default_cache_dir() / "bench"
    results = {"machine": machine_info(), "near_duplicates": {}, "mislabels": {}}
    for pool in args.pools.split(","):
        results["near_duplicates"][pool] = near_duplicate_scores(pool)
        print(pool, json.dumps(results["near_duplicates"][pool]), flush=True)
        for name in args.datasets.split(","):
            for c in (float(text) for text in args.mislabel_c.split(",")):
                found = planted_flips(name, pool, cache, args.seeds, c)
                results["mislabels"].setdefault(name, {}).setdefault(pool, {})[f"C={c:g}"] = found
                print(pool, name, f"C={c:g}: recall {np.mean(found['recall']):.3f}, "
                                  f"others flagged {np.mean(found['other_flagged']):.1f}", flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
