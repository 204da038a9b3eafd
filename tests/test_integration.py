"""End to end with the real offline Lite0 weights: an unseen folder of RGBA photo cut-outs in 5 classes, with bad
files planted, trains to a sane accuracy, skips exactly the bad files, and predicts from the run folder alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageDraw

from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.runs.run import Run

PHOTOS = {"cat": skimage.data.chelsea, "coffee": skimage.data.coffee, "astronaut": skimage.data.astronaut,
          "rocket": skimage.data.rocket, "camera": skimage.data.camera}


def cutout(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random crop of the photo, resized, with an elliptical alpha mask (transparent outside)."""
    image = Image.fromarray(photo).convert("RGB")
    w, h = image.size
    side = int(min(w, h) * rng.uniform(0.6, 0.95))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    size = int(rng.integers(72, 112))
    crop = image.crop((x, y, x + side, y + side)).resize((size, size))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse((2, 2, size - 3, size - 3), fill=255)
    crop.putalpha(mask)
    return crop


def make_cutouts(root: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, photo in PHOTOS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            cutout(photo(), rng).save(root / name / f"{name}_{i}.png")


def plant_bad_files(root: Path) -> set[str]:
    good = next((root / "cat").iterdir()).read_bytes()
    bad = {root / "cat" / "truncated.png": good[: len(good) // 3], root / "coffee" / "empty.jpg": b"",
           root / "rocket" / "text.jpg": b"this is not a jpeg", root / "camera" / "notes.txt": b"notes",
           root / "astronaut" / ".DS_Store": b"\x00\x01"}
    for path, content in bad.items():
        path.write_bytes(content)
    return {str(path.resolve()) for path in bad}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path, set[str]]:
    root = tmp_path_factory.mktemp("cutouts")
    make_cutouts(root / "data", per_class=10, seed=0)
    planted = plant_bad_files(root / "data")
    run = api.train(root / "data", root / "run", quiet=True, epochs_frozen=15, epochs_finetune=1, unfreeze="1",
                    feature_views=2, batch_size=16)
    return run, root, planted


def test_sane_accuracy_with_real_lite0(trained):
    run, _, _ = trained
    assert run.meta["weights_source"].startswith("offline:")
    assert run.meta["image_size"] == 224 and run.meta["mean"] == [0.5, 0.5, 0.5]
    assert run.metrics["accuracy"] >= 0.8, run.metrics


def test_exactly_the_bad_files_are_skipped(trained):
    run, _, planted = trained
    skipped = {item["path"] for item in json.loads((run.path / "metrics.json").read_text())["skipped_files"]}
    assert skipped == planted


def test_predict_from_the_run_folder_alone(trained, tmp_path, capsys):
    run, root, _ = trained
    moved = tmp_path / "elsewhere"
    shutil.copytree(run.path, moved)
    make_cutouts(tmp_path / "new", per_class=2, seed=123)
    assert run_cli(["predict", str(moved), str(tmp_path / "new"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    correct = sum(Path(r["path"]).parent.name == r["label"] for r in results)
    assert len(results) == 10 and correct >= 8, results


def test_int8_export_of_a_real_photo_run_agrees_with_fp32(trained, tmp_path, capsys):
    # The run the issue saw refused at 90% agreement on a CPU without VNNI: 7-bit weights pass on every CPU.
    from transferkit.export.onnx import export_run
    from transferkit.predictor import OnnxPredictor

    run, root, _ = trained
    report = export_run(run.path, int8=True, out=tmp_path / "model.int8.onnx")
    assert report.check.agreement >= 0.99 and report.check.images >= 8
    paths = sorted(str(p) for p in (root / "data").rglob("*_[0-9].png"))
    agree = OnnxPredictor(tmp_path / "model.int8.onnx").probabilities(paths).argmax(1) == run.probabilities(
        paths).argmax(1)
    assert agree.mean() >= 0.99
