"""JPEGs decode at libjpeg's reduced scales when the consumer resizes them anyway (decision 0295): smaller, never
below the size asked for, close to the full decode; other formats, crops and validation keep what they need."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import v2 as T

from transferkit.data.boxes import Box
from transferkit.data.images import decode_image, load_image, load_rgb
from transferkit.data.loader import ImageDataset
from transferkit.data.preprocess import Preprocess
from transferkit.data.sources import image_problems
from transferkit.data.transforms import Symmetry, decode_size, eval_transform, train_transform
from transferkit.options import AUGMENT_PRESETS
from transferkit.report.figures import THUMBNAIL_PX, upscale_note
from transferkit.report.images import Predictions, load_chosen

PRE = Preprocess(image_size=224, interpolation="bicubic", crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3)


def photo(path: Path, size: tuple[int, int] = (2000, 1500), fmt: str = "JPEG") -> Path:
    """A smooth picture (gradients and a disc) with a little noise, as a camera's would be."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (height / 3) ** 2) * 120
    noise = np.random.default_rng(0).normal(0, 4, (height, width))
    pixels = np.stack([x * 255 / width, y * 255 / height, disc + noise], axis=-1).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def test_a_large_jpeg_decodes_smaller_but_never_below_the_size_asked_for(tmp_path: Path) -> None:
    path = photo(tmp_path / "big.jpg")
    full, reduced = load_rgb(path), load_rgb(path, reduce_to=PRE.resize_size)
    assert full.size == (2000, 1500) and reduced.size == (500, 375)  # 1/4: 1/8 would leave 187 < 256 rows
    assert min(reduced.size) >= PRE.resize_size and reduced.mode == "RGB"
    same_size = np.asarray(full.resize(reduced.size, Image.BICUBIC), dtype=np.float32)
    assert np.abs(np.asarray(reduced, dtype=np.float32) - same_size).mean() < 3  # the same picture
    assert decode_image(path.read_bytes(), reduce_to=PRE.resize_size).size == reduced.size


def test_other_formats_crops_and_small_images_decode_in_full(tmp_path: Path) -> None:
    png = photo(tmp_path / "big.png", fmt="PNG")
    assert load_rgb(png, reduce_to=PRE.resize_size).size == (2000, 1500)
    jpeg = photo(tmp_path / "big.jpg")
    region = Box(100, 100, 900, 700)  # a box's coordinates are the full image's
    assert load_image(str(jpeg), region, PRE.resize_size).size == load_image(str(jpeg), region).size == (800, 600)
    small = photo(tmp_path / "small.jpg", (300, 280))
    assert load_rgb(small, reduce_to=PRE.resize_size).size == (300, 280)


def test_validation_still_refuses_a_truncated_jpeg_and_checks_boxes_at_full_size(tmp_path: Path) -> None:
    whole = photo(tmp_path / "big.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    inside = Box(1000, 800, 1900, 1400)  # inside 2000 x 1500, outside the 1/8 scale's 250 x 188
    problems = image_problems([str(tmp_path / "big.jpg"), str(cut), str(tmp_path / "big.jpg")], boxes=[
        None, None, inside])
    assert problems == [None, "truncated or corrupt", None]


@pytest.mark.parametrize(("transform", "expected"), [
    (eval_transform(PRE), 256),
    (T.Compose([eval_transform(PRE), Symmetry(3)]), 256),  # the frozen stage's dihedral views
    (train_transform(PRE, AUGMENT_PRESETS["light"]), 256),  # resized first, then turned and shifted
    # a random resized crop of 35% of the area at aspect 3:4 still spans 224 px: 224 / sqrt(0.35 * 0.75) = 437.2
    (train_transform(PRE, AUGMENT_PRESETS["strong"]), 438),
    (T.Compose([T.RandomHorizontalFlip(), T.Resize(256)]), None),  # not resized first: every pixel
])
def test_datasets_decode_as_small_as_their_transform_allows(transform, expected: int | None) -> None:
    assert decode_size(transform) == expected
    assert ImageDataset(["x.jpg"], None, transform).reduce_to == expected



def test_the_reports_pictures_decode_large_jpegs_no_smaller_than_they_are_shown(tmp_path: Path) -> None:
    path = photo(tmp_path / "big.jpg", (2400, 1800))
    pred = Predictions([str(path), str(tmp_path / "gone.jpg")], np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]))
    kept, unreadable = load_chosen(pred, [0, 1], THUMBNAIL_PX)
    assert unreadable == 1 and kept[0][1].size == (300, 225)  # 1/8: both sides still at least 128
    assert upscale_note(kept[0][1].size, THUMBNAIL_PX) == ""  # not mistaken for a small image
