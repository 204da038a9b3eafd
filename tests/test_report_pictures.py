"""The report's pictures: every card the same size whatever the photo's shape, an enlarged small image says so, a
byte-identical copy is shown once, and the curves carry whole epochs and the kept one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_class_folders
from tests.test_report import visible_report
from transferkit import api
from transferkit.report.figures import LETTERBOX, letterbox, upscale_note
from transferkit.report.images import Predictions, top_losses_section
from transferkit.runs.evaluate import plot_curves


def test_letterbox_keeps_the_whole_picture_in_a_fixed_square() -> None:
    wide = Image.new("RGB", (307, 172), (200, 30, 30))
    boxed = np.asarray(letterbox(wide, 128)).astype(int)
    assert boxed.shape == (128, 128, 3)
    assert (boxed[0, 64] == LETTERBOX).all() and (boxed[-1, 64] == LETTERBOX).all()  # bars above and below
    assert (np.abs(boxed[64, 0] - (200, 30, 30)) <= 2).all() and (np.abs(boxed[64, -1] - (200, 30, 30)) <= 2).all()
    tiny = np.asarray(letterbox(Image.new("RGB", (32, 32), (10, 200, 10)), 128))
    assert tiny.shape == (128, 128, 3) and (tiny == (10, 200, 10)).all()  # enlarged whole, no blur at the edges
    assert upscale_note((32, 32), 128) == "enlarged: the image is only 32x32 px"
    assert upscale_note((307, 172), 128) == ""


def write_image(path: Path, colour: tuple[int, int, int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return str(path)


def test_a_copy_is_shown_once_among_the_top_losses(tmp_path: Path) -> None:
    first = write_image(tmp_path / "a.png", (200, 0, 0))
    copy = str(shutil.copy(first, tmp_path / "a_copy.png"))
    other = write_image(tmp_path / "b.png", (0, 0, 200))
    # all three wrong, the copies with the largest loss
    pred = Predictions([first, copy, other], np.array([0, 0, 0]), np.array([[0.1, 0.9], [0.1, 0.9], [0.3, 0.7]]))
    cards = top_losses_section(pred, ["red", "blue"])["cards"]
    assert [c["path"] for c in cards] == [first, other]
    assert list(pred.best_of_each_class(2, 10)) == [2, 0]  # per class, distinct images only


def test_curves_have_whole_epoch_ticks_and_mark_the_kept_epoch(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    history = [{"stage": "finetune", "epoch": e, "train_loss": 1 / e, "train_acc": 0.5, "val_loss": 1 / e,
                "val_acc": 0.5} for e in (1, 2, 3)]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at its axes
    plot_curves(history, tmp_path / "curves.png", {"stage": "finetune", "epoch": 2})
    loss = figures[0].axes[0]
    ticks = [t for t in loss.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    [star] = [line for line in loss.get_lines() if line.get_marker() == "*"]
    assert list(star.get_xdata()) == [2] and list(star.get_ydata()) == [0.5]
    assert "kept: finetune epoch 2" in [text.get_text() for text in loss.get_legend().get_texts()]


@pytest.fixture(scope="module")
def mixed_shapes_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str):
    """A barely trained run (right and wrong predictions) on photos wide, tall and square (the cards' worst case)."""
    root = tmp_path_factory.mktemp("shapes")
    data = make_class_folders(root / "data", per_class=12)
    for i, path in enumerate(sorted(data.rglob("*.png"))):
        size = [(80, 30), (30, 80), (40, 40)][i % 3]
        Image.open(path).resize(size).save(path)
    return api.train(data, root / "run", backbone="test_efficientnet", weights=tiny_weights, image_size=32,
                     workers=0, epochs_frozen=1, head_fit="sgd", epochs_finetune=0, lr=1e-4, augment="none",
                     quiet=True)


@pytest.mark.parametrize("gallery", ["gallery", "top-losses"])
@pytest.mark.browser
def test_cards_of_a_gallery_are_all_the_same_size_in_chromium(mixed_shapes_run, gallery):
    run = mixed_shapes_run
    problems, requests = [], []
    playwright, browser, page = visible_report(run.path / "report.html", problems, requests)
    try:
        sizes = page.locator(f"#{gallery} .card").evaluate_all(
            "cards => cards.map(c => [c.offsetWidth, c.offsetHeight, c.querySelector('img').offsetHeight])")
    finally:
        browser.close()
        playwright.stop()
    assert len(sizes) >= 4 and problems == []
    assert len({tuple(size) for size in sizes}) == 1, sizes
