"""Image-level problems through CleanVision (Cleanlab's image auditor): blurry, too dark or too light, little
information, an odd aspect ratio or size, and grayscale images among colour ones."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from transferkit.data.images import load_rgb, open_image_file
from transferkit.data.sources import Sample
from transferkit.errors import UnreadableImage

# CleanVision's names, in the order the summary lists an image's problems; its default thresholds throughout.
ISSUE_TYPES = ("blurry", "dark", "light", "low_information", "odd_aspect_ratio", "odd_size", "grayscale")
SIZE_CHECK = "odd_size"
SCALED_SIDE = 256  # the other checks' view of a large JPEG; CleanVision's blur check shrinks images to 64 px itself
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
# Grayscale is a problem when a few images lack the colour the rest have; a grayscale dataset (ELPV's solar cells)
# would otherwise flag every image.
GRAYSCALE_MINORITY = 0.5
# CleanVision pickles its dataset into every task it hands its process pool (~5,000 tasks), so a dataset that
# pickled its sample list cost O(N^2): on the 2,624 ELPV cells 2 processes took 45 s against 20 s for one (decision
# 0240). Samples are left here before the pool forks, and each task carries only a key.
_SHARED: dict[int, list[Sample]] = {}


def image_issues(samples: Sequence[Sample], workers: int) -> list[dict]:
    """One entry per image with a problem: its file and the CleanVision issue types it has. `odd_size` is judged on
    each file's own size, every other check on the image as large JPEGs decode for the model (decision 0295)."""
    pixel_checks = [name for name in ISSUE_TYPES if name != SIZE_CHECK]
    flags = {**cleanvision_flags(SampleImages(samples), pixel_checks, workers),
             **cleanvision_flags(SampleImages(samples, sizes_only=True), [SIZE_CHECK], workers)}
    if flags["grayscale"].mean() >= GRAYSCALE_MINORITY:
        flags["grayscale"][:] = False
    found = []
    for row, sample in enumerate(samples):
        issues = [name for name in ISSUE_TYPES if flags[name][row]]
        if issues:
            found.append({"path": sample.path, "label": sample.label, "split": sample.split, "issues": issues})
    return found


def cleanvision_flags(images: SampleImages, checks: list[str], workers: int) -> dict[str, np.ndarray]:
    """CleanVision's verdict on `images` for each check: one boolean per image."""
    from cleanvision import Imagelab  # imports pandas: only when the check runs

    lab = Imagelab(torchvision_dataset=images, verbose=False)
    # forked processes see _SHARED as it was at the fork; other start methods would not, so they get one process
    processes = max(1, workers) if multiprocessing.get_start_method() == "fork" else 1
    _SHARED[images.key] = images.samples
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            # CleanVision prints to stdout (doctor's --json goes there) and draws its own progress bar on stderr
            lab.find_issues({name: {} for name in checks}, n_jobs=processes, verbose=False)
    finally:
        del _SHARED[images.key]
    return {name: lab.issues[f"is_{name}_issue"].to_numpy(copy=True) for name in checks}


class SampleImages:
    """The samples as the (image, label) pairs CleanVision reads from a torchvision dataset: decoded by transferkit
    (shard members, EXIF orientation, any bit depth, large JPEGs at a reduced scale down to SCALED_SIDE), grayscale
    files kept grayscale so CleanVision can tell them. `sizes_only`: blank images of each file's own size, all that
    CleanVision's size check reads."""

    def __init__(self, samples: Sequence[Sample], sizes_only: bool = False) -> None:
        self.samples, self.sizes_only = list(samples), sizes_only
        self.key = id(self)

    def __getstate__(self) -> dict:
        return {"key": self.key, "sizes_only": self.sizes_only}  # the samples travel through _SHARED (see there)

    def __setstate__(self, state: dict) -> None:
        self.key, self.sizes_only, self.samples = state["key"], state["sizes_only"], _SHARED[state["key"]]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image | None, str]:
        sample = self.samples[index]
        try:
            with open_image_file(sample.path) as handle, Image.open(handle) as header:
                gray, size = header.mode in GRAY_MODES, header.size  # an area: turning it changes nothing
            if self.sizes_only:
                return Image.new("L", size), sample.label
            image = load_rgb(sample.path, reduce_to=SCALED_SIDE)
        except (OSError, UnreadableImage):
            return None, sample.label  # CleanVision leaves an image it cannot read out of every check
        return (image.convert("L") if gray else image), sample.label
