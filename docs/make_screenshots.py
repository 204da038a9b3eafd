"""Render docs/assets/report.png and docs/assets/serve.png from a real run, in Chromium. Run it again whenever the
report or the serve page changes:

    PYTHONPATH=. .venv/bin/python docs/make_screenshots.py [--chromium /usr/bin/chromium]

The run is small and honest: three classes cut from scikit-image's sample photos (random crops and flips, so the
classes are learnable and the pictures look like something), EfficientNet-Lite0 with its offline weights, a few
epochs, in a temporary folder. Nothing but the two PNGs is kept.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS = Path(__file__).resolve().parent / "assets"
PHOTOS = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}
PER_CLASS = 14
WIDTH = 900  # px of the saved PNGs: legible on a README, small in the repository


def make_dataset(root: Path, seed: int = 0) -> Path:
    from skimage import data

    rng = np.random.default_rng(seed)
    for label, name in PHOTOS.items():
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            side = int(min(photo.size) * rng.uniform(0.6, 0.95))
            left, top = (int(rng.integers(0, extent - side + 1)) for extent in photo.size)
            crop = photo.crop((left, top, left + side, top + side)).resize((160, 160))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(folder / f"{label}_{i:02d}.jpg", quality=90)
    return root


def save_png(png: bytes, target: Path) -> None:
    import io

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.Resampling.LANCZOS)
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    print(f"{target} ({target.stat().st_size // 1024} KB)")


def wait_for(url: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)  # noqa: S310 - our own server on loopback
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the server did not answer at {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    from playwright.sync_api import expect, sync_playwright

    import transferkit

    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "photos")
        run = transferkit.train(data, Path(tmp) / "run", epochs_frozen=8, epochs_finetune=1, workers=0,
                                cache_dir=str(Path(tmp) / "cache"), quiet=True)
        server = subprocess.Popen([sys.executable, "-m", "transferkit", "serve", str(run.path), "--port",
                                   str(args.port)], stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{args.port}/"
            wait_for(base + "health")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--headless"])
                # Tall enough to show the header, the data table and the first training curves.
                page = browser.new_page(viewport={"width": 1100, "height": 1150})
                page.goto((run.path / "report.html").as_uri())
                save_png(page.screenshot(), ASSETS / "report.png")
                page = browser.new_page(viewport={"width": 1100, "height": 760})
                page.goto(base)
                expect(page.locator("#model-info")).to_contain_text("cat")
                page.locator("#files").set_input_files([str(data / label / f"{label}_00.jpg") for label in PHOTOS])
                expect(page.locator(".card .prediction .label")).to_have_count(len(PHOTOS), timeout=60_000)
                expect(page.locator("img.gradcam")).to_have_count(len(PHOTOS), timeout=60_000)
                save_png(page.screenshot(), ASSETS / "serve.png")
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
