"""Doctor's options and thresholds, without PyTorch: `--help` shows their defaults."""

from __future__ import annotations

from dataclasses import dataclass

from transferkit.errors import UserError
from transferkit.options import (
    DEFAULT_BACKBONE,
    ENGINES,
    MAX_IMAGE_SIZE,
    MAX_SEED,
    MIN_IMAGE_SIZE,
    POOLS,
    valid_image_size,
)

# Re-encoded, brightened and resized copies score above it, distinct photos far below (decision 0223).
NEAR_THRESHOLD = 0.95
MAX_IMBALANCE = 3.0
MIN_SIDE = 32
# Above this share of images in near-duplicate groups the images are alike as a whole, not copies of each other.
ALIKE_SHARE = 0.2


@dataclass
class DoctorOptions:
    """What doctor embeds with and where it draws its lines; the embedding settings match `train`'s."""

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None  # a local ImageNet weights file, as for train
    image_size: int | None = None  # None: the backbone's input size
    crop_pct: float | None = None  # None: the backbone's
    pool: str = "auto"  # as train's, so that train finds doctor's features in the cache (decision 0302)
    near_threshold: float = NEAR_THRESHOLD
    max_imbalance: float = MAX_IMBALANCE  # largest / smallest class count above this is flagged
    min_size: int = MIN_SIDE  # pixels; the input size / 4 when that is larger
    val_split: float = 0.2  # as train, so "leakage" is about the split train would make
    test_split: float = 0.0
    seed: int = 0
    batch_size: int = 32
    workers: int = 2
    engine: str = "auto"
    cache: bool = True
    cache_dir: str | None = None
    quiet: bool = False

    def validate(self) -> DoctorOptions:
        rules = [
            (0 < self.near_threshold <= 1, "near threshold must be in (0, 1]"),
            (self.max_imbalance >= 1, "max imbalance must be at least 1"),
            (self.min_size >= 1, "min size must be at least 1 pixel"),
            (valid_image_size(self.image_size),
             f"image size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels"),
            (self.crop_pct is None or 0.2 <= self.crop_pct <= 1.0, "crop_pct must be between 0.2 and 1"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.workers >= 0, "workers must be 0 or more"),
            (0 <= self.seed <= MAX_SEED, f"seed must be between 0 and {MAX_SEED}"),
            (self.engine in ENGINES, f"engine must be one of {', '.join(ENGINES)}"),
            (self.pool in POOLS, f"pool must be one of {', '.join(POOLS)}"),
        ]
        for ok, message in rules:
            if not ok:
                raise UserError(f"bad doctor option: {message}")
        from transferkit.data.sources import check_fractions  # reads images: not for `--help`

        check_fractions(self.val_split, self.test_split)
        return self
