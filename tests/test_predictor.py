"""Predicting from an export needs neither PyTorch nor timm: Pillow + numpy preprocessing that is torchvision's, bit
for bit, and ONNX Runtime; the answers are the PyTorch run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_export import train_run
from transferkit.data.preprocess import Preprocess
from transferkit.export.check import pixel_transform
from transferkit.export.onnx import export_run

PROBE = """
import json, sys
from transferkit.cli.main import run_cli
code = run_cli(sys.argv[1:])
print(json.dumps(sorted(name for name in ("torch", "timm", "torchvision", "openvino") if name in sys.modules)),
      file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_numpy_pixels_equal_torchvisions_bit_for_bit(interpolation, crop_pct):
    pre = Preprocess(image_size=64, interpolation=interpolation, crop_pct=crop_pct, mean=(0.5,) * 3, std=(0.5,) * 3)
    rng = np.random.default_rng(0)
    shapes = [(307, 172), (172, 307), (73, 73), (64, 64), (40, 90), (1000, 3)]  # wide, tall, odd, exact, small, thin
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in shapes]
    expected = np.stack([pixel_transform(pre)(image).numpy() for image in images])
    assert np.array_equal(pre.pixels(images), expected)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_weights) -> Path:
    root = train_run(tmp_path_factory.mktemp("predictor"), 3, tiny_weights)
    export_run(root / "run")
    return root


def predict(run: Path, images: list[Path], engine: str) -> tuple[list[dict], list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, "predict", str(run), *map(str, images), "--json", "--engine",
                           engine], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), json.loads(done.stderr.strip().splitlines()[-1])


def test_predict_from_an_export_loads_no_torch_and_agrees_with_pytorch(exported):
    images = sorted((exported / "data").rglob("*.png"))[::7]
    from_export, loaded = predict(exported / "run", images, "onnx")
    assert loaded == []
    from_torch, loaded = predict(exported / "run", images, "torch")
    assert "torch" in loaded
    assert [r["label"] for r in from_export] == [r["label"] for r in from_torch]
    for ours, theirs in zip(from_export, from_torch, strict=True):
        assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-4)
