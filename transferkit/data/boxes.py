"""Bounding boxes from a CSV's x1,y1,x2,y2 columns (the Stanford Cars tutorial): parsed and checked while scanning,
and applied right after decoding, so every consumer (features, fine-tuning, evaluation, export, report) sees the
same cropped pixels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import astuple, dataclass

from PIL import Image

from transferkit.errors import UserError

BOX_COLUMNS = ("x1", "y1", "x2", "y2")


@dataclass(frozen=True)
class Box:
    """Pixel coordinates in the decoded (EXIF-oriented) image: left, top, right, bottom (right and bottom
    exclusive, as in PIL's crop)."""

    x1: float
    y1: float
    x2: float
    y2: float

    def with_margin(self, margin: float) -> Box:
        """The box grown by `margin` times its own width (height) on each side; clipped to the image on cropping."""
        dx, dy = margin * (self.x2 - self.x1), margin * (self.y2 - self.y1)
        return Box(self.x1 - dx, self.y1 - dy, self.x2 + dx, self.y2 + dy)

    def to_list(self) -> list[float]:
        return list(astuple(self))

    def key(self) -> str:
        """Exact text of the coordinates (repr round-trips floats): part of a feature-cache key."""
        return ",".join(repr(float(v)) for v in astuple(self))

    def outside(self, width: int, height: int) -> str | None:
        """Why the box does not fit a width x height image, or None."""
        if self.x1 < 0 or self.y1 < 0 or self.x2 > width or self.y2 > height:
            return f"box {self.key()} outside the image ({width}x{height})"
        return None


def has_box_columns(fieldnames: Sequence[str]) -> bool:
    """True when the CSV header has all four box columns; some but not all of them is a mistake worth naming."""
    present = [c for c in BOX_COLUMNS if c in fieldnames]
    if present and len(present) < len(BOX_COLUMNS):
        missing = ", ".join(c for c in BOX_COLUMNS if c not in fieldnames)
        raise UserError(f"CSV has box column(s) {', '.join(present)} but not {missing}: a box needs x1,y1,x2,y2")
    return bool(present)


def parse_box(cells: Sequence[str]) -> tuple[Box | None, str | None]:
    """(box, None) for four numbers with x1 < x2 and y1 < y2, else (None, why the row is skipped)."""
    try:
        values = [float(cell) for cell in cells]
    except ValueError:
        return None, f"box ({', '.join(cells)}) is not four numbers"
    if not all(math.isfinite(v) for v in values):
        return None, f"box ({', '.join(cells)}) is not four finite numbers"
    box = Box(*values)
    if box.x2 <= box.x1 or box.y2 <= box.y1:
        return None, f"box {box.key()} is empty: needs x1 < x2 and y1 < y2"
    return box, None


def crop_to(image: Image.Image, region: Box | None) -> Image.Image:
    """The part of `image` inside `region` (clipped to the image); the image itself when there is no region."""
    if region is None:
        return image
    width, height = image.size
    left, top = min(max(round(region.x1), 0), width - 1), min(max(round(region.y1), 0), height - 1)
    right, bottom = max(min(round(region.x2), width), left + 1), max(min(round(region.y2), height), top + 1)
    return image.crop((left, top, right, bottom))


def crop_regions(boxes: Sequence[Box | None], margin: float) -> list[Box | None] | None:
    """What to crop for each image (its box plus margin), or None when no image has a box (nothing to crop)."""
    if all(box is None for box in boxes):
        return None
    return [None if box is None else box.with_margin(margin) for box in boxes]
