"""Every tutorial page's commands run, so the pages cannot rot.

Each page's ```bash blocks run line by line in a folder holding stand-in data with the page's layout (generated
images, as conftest makes them), then its ```python blocks. The real datasets and backbones are not available
offline, so two things are substituted, and only these: every backbone becomes timm's tiny `test_efficientnet`
with the seeded weights file conftest writes (at 32 px, no loader workers), and `transferkit` runs in-process.
Everything else (recipes, flags, paths, splits, boxes) is exactly what the page says.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_image
from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.recipes import RECIPES

PAGES = Path(__file__).resolve().parents[1] / "docs" / "tutorials"
TINY = dict(backbone="test_efficientnet", image_size=32, workers=0, batch_size=8, quiet=True)


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def shell_lines(page: Path) -> list[list[str]]:
    lines = [line for block in fenced(page.read_text(), "bash") for line in block.splitlines()]
    return [argv for argv in (shlex.split(line, comments=True) for line in lines) if argv]


def epochs(recipe: str | None, finetune: int | None) -> dict[str, int]:
    """Two frozen epochs and at most one fine-tuning epoch: fast, yet a page's fine-tuning still fine-tunes and a
    frozen-only recipe (the conservative strategy) stays frozen-only."""
    finetune = RECIPES[recipe or "default"].get("epochs_finetune", 1) if finetune is None else finetune
    return {"epochs_frozen": 2, "epochs_finetune": min(finetune, 1)}


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def stand_in(argv: list[str], weights: str) -> list[str]:
    """The page's command with the tiny backbone in place of the real one (click keeps an option's last value)."""
    command = argv[1] if len(argv) > 1 else ""
    backbone = ["--backbone", "test_efficientnet", "--weights", weights]
    if command == "train":
        finetune = option(argv, "--epochs-finetune")
        capped = epochs(option(argv, "--recipe"), None if finetune is None else int(finetune))
        return argv[1:] + backbone + ["--image-size", "32", "--workers", "0", "--batch-size", "8", "--quiet",
                                      "--epochs-frozen", "2", "--epochs-finetune", str(capped["epochs_finetune"])]
    if command == "imagenet" or (command == "similarity" and "--backbone" in argv):
        return argv[1:] + backbone
    return argv[1:]


# ---- stand-in data, one layout per page ----


def _save(path: Path, class_index: int, rng: np.random.Generator, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(class_index, rng, size).save(path, quality=95)


def urban_rural(root: Path, rng: np.random.Generator) -> None:
    for split, count in (("train", 10), ("val", 4)):
        for c, name in enumerate(("rural", "urban")):
            for i in range(count):
                _save(root / "urban_rural" / split / name / f"{name}_{i:03d}.jpg", c, rng)


def cats_dogs(root: Path, rng: np.random.Generator) -> None:
    for c, name in enumerate(("cat", "dog")):  # Kaggle's flat folder: the label is in the file name
        for i in range(12):
            _save(root / "train" / f"{name}.{i}.jpg", c, rng)


CHAMPIONS = ("Anand", "Carlsen", "Fischer", "Karpov", "Kasparov")


def chess(root: Path, rng: np.random.Generator) -> None:
    for c, name in enumerate(CHAMPIONS):
        for i in range(8):
            _save(root / "chess" / name / f"{name.lower()}_{i:03d}.jpg", c, rng)


CARS = ("Audi TTS Coupe 2012", "Acura TL Sedan 2012", "BMW M3 Coupe 2012", "Ford GT Coupe 2006",
        "Volvo 240 Sedan 1993", "Tesla Model S Sedan 2012")


def cars(root: Path, rng: np.random.Generator) -> None:
    rows, n = ["path,label,x1,y1,x2,y2,split"], 0
    for c, label in enumerate(CARS):
        for i in range(8):
            n += 1
            _save(root / "cars" / f"{n:05d}.jpg", c, rng, size=64)
            # The coloured square (the "car") sits in the image's upper-left 48 px; the box keeps it. Training rows
            # leave the split empty, as the page says, so --val-split carves validation images out of them.
            rows.append(f"cars/{n:05d}.jpg,{label},2,2,50,50,{'test' if i >= 6 else ''}")
    (root / "cars_annos.csv").write_text("\n".join(rows) + "\n")


STAND_IN: dict[str, Callable[[Path, np.random.Generator], None]] = {
    "urban-rural": urban_rural,
    "cats-dogs": cats_dogs,
    "chess": chess,
    "cars": cars,
}

# What each page says its commands leave behind (checked after they ran, so a page cannot pass by doing nothing).
EXPECTED = {
    "urban-rural": ["runs/urban-rural/report.html", "runs/urban-rural/curves.png", "runs/urban-rural-py/meta.json"],
    "cats-dogs": ["cats_dogs/cat/cat.0.jpg", "runs/conservative/metrics.json", "runs/dynamic/metrics.json",
                  "runs/dynamic-py/meta.json"],
    "chess": ["runs/chess/confusion.png", "cams/carlsen_000_gradcam.png", "cams_kasparov/carlsen_000_gradcam.png",
              "carlsen_similarity.png", "carlsen_imagenet.png", "cams-py"],
    "cars": ["runs/cars-xception/metrics.json", "runs/cars-lite2/metrics.json", "runs/cars-lite2-py/meta.json"],
}


def test_every_tutorial_page_has_a_stand_in_and_runnable_blocks() -> None:
    pages = {page.stem for page in PAGES.glob("*.md")}
    assert pages == set(STAND_IN) == set(EXPECTED)
    for name in pages:
        text = (PAGES / f"{name}.md").read_text()
        assert fenced(text, "bash") and fenced(text, "python"), name


def test_stand_in_swaps_only_the_backbone() -> None:
    argv = shlex.split("transferkit train d/ --out r --recipe chess --weights big.safetensors --test-split 0.2")
    swapped = stand_in(argv, "tiny.safetensors")
    assert swapped[: len(argv) - 1] == argv[1:]
    assert swapped[swapped.index("--weights", len(argv) - 1) + 1] == "tiny.safetensors"
    assert option(swapped, "--epochs-finetune") == "0"  # the chess recipe trains the head only: so does its stand-in
    dynamic = stand_in(shlex.split("transferkit train d/ --out r --recipe cats-dogs --epochs-finetune 3"), "w")
    assert dynamic[-1] == "1"
    assert stand_in(shlex.split("transferkit explain runs/chess a.jpg --out cams/"), "w") == [
        "explain", "runs/chess", "a.jpg", "--out", "cams/"]


@pytest.mark.parametrize("name", sorted(STAND_IN))
def test_tutorial_commands_run(name: str, tmp_path: Path, tiny_weights: str, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    STAND_IN[name](tmp_path, np.random.default_rng(0))
    monkeypatch.chdir(tmp_path)
    page = PAGES / f"{name}.md"
    for argv in shell_lines(page):
        if argv[0] == "transferkit":
            assert run_cli(stand_in(argv, tiny_weights)) == 0, f"{page.name}: {shlex.join(argv)}\n{capsys.readouterr()}"
        else:
            subprocess.run(shlex.join(argv) if "*" not in " ".join(argv) else " ".join(argv), shell=True,
                           check=True, cwd=tmp_path)

    real_train = api.train
    monkeypatch.setattr(api, "train", lambda data, out, recipe=None, **options: real_train(
        data, out, recipe=recipe, **{**options, **TINY, "weights": tiny_weights,
                                     **epochs(recipe, options.get("epochs_finetune"))}))
    for block in fenced(page.read_text(), "python"):
        exec(compile(block, f"{page.name}:python", "exec"), {"__name__": "__tutorial__"})  # noqa: S102

    missing = [path for path in EXPECTED[name] if not (tmp_path / path).exists()]
    assert not missing, f"{page.name}: its commands did not write {missing}"
