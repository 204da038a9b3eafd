"""Image-level problems through CleanVision (Cleanlab's image auditor): blurry, too dark or too light, little
information, an odd aspect ratio or size, and grayscale images among colour ones."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from PIL import Image

from transferkit.data.images import load_rgb, open_image_file
from transferkit.data.sources import Sample
from transferkit.errors import UnreadableImage

# CleanVision's names, in the order the summary lists an image's problems; its default thresholds throughout.
ISSUE_TYPES = ("blurry", "dark", "light", "low_information", "odd_aspect_ratio", "odd_size", "grayscale")
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
# Grayscale is a problem when a few images lack the colour the rest have; a grayscale dataset (ELPV's solar cells)
# would otherwise flag every image.
GRAYSCALE_MINORITY = 0.5


def image_issues(samples: Sequence[Sample], workers: int) -> list[dict]:
    """One entry per image with a problem: its file and the CleanVision issue types it has."""
    from cleanvision import Imagelab  # imports pandas: only when the check runs

    lab = Imagelab(torchvision_dataset=SampleImages(samples), verbose=False)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        # CleanVision prints to stdout (doctor's --json goes there) and draws its own progress bar on stderr
        lab.find_issues({name: {} for name in ISSUE_TYPES}, n_jobs=max(1, workers), verbose=False)
    flags = {name: lab.issues[f"is_{name}_issue"].to_numpy(copy=True) for name in ISSUE_TYPES}
    if flags["grayscale"].mean() >= GRAYSCALE_MINORITY:
        flags["grayscale"][:] = False
    found = []
    for row, sample in enumerate(samples):
        issues = [name for name in ISSUE_TYPES if flags[name][row]]
        if issues:
            found.append({"path": sample.path, "label": sample.label, "split": sample.split, "issues": issues})
    return found


class SampleImages:
    """The samples as the (image, label) pairs CleanVision reads from a torchvision dataset: decoded by transferkit
    (shard members, EXIF orientation, any bit depth), grayscale files kept grayscale so CleanVision can tell them."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image | None, str]:
        sample = self.samples[index]
        try:
            with open_image_file(sample.path) as handle, Image.open(handle) as header:
                gray = header.mode in GRAY_MODES
            image = load_rgb(sample.path)
        except (OSError, UnreadableImage):
            return None, sample.label  # CleanVision leaves an image it cannot read out of every check
        return (image.convert("L") if gray else image), sample.label
