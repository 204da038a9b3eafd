"""What the benchmarks share: generated images that a classifier can learn, and readings of the machine."""

from __future__ import annotations

import os
import platform
import re
import resource
from pathlib import Path

import numpy as np
import onnxruntime
import openvino
import timm
import torch
from PIL import Image, ImageDraw

from transferkit import cpu


def peak_rss_mb() -> dict[str, float]:
    """Peak resident MB so far: this process (VmHWM, as ru_maxrss in a process started from here reports our peak:
    Linux carries it across exec) and the largest reaped child (loader workers; counts pages shared with us)."""
    hwm_kib = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)
    return {"self": int(hwm_kib) / 1024, "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def cpu_seconds() -> tuple[float, float]:
    """(CPU-seconds the whole machine was busy, CPU-seconds of this process and its reaped children): the
    difference over the run is what other processes took."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    own = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    return busy, own.user + own.system + own.children_user + own.children_system


def make_image(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """A noisy gradient with clutter lines and one shape of random colour, size and place: an ellipse for class 0,
    a rectangle for class 1. Only the shape separates the classes, so validation accuracy means something."""
    low, high = rng.integers(0, 256, (2, 1, 1, 3))
    pixels = low + (high - low) * np.linspace(0, 1, size)[None, :, None] + rng.normal(0, 12, (size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colours = [tuple(c) for c in rng.integers(0, 256, (4, 3)).tolist()]  # three clutter lines, then the shape
    for colour in colours[:3]:
        draw.line(tuple(rng.integers(0, size, 4).tolist()), fill=colour, width=max(1, size // 64))
    extent = rng.uniform(0.3, 0.6) * size
    x, y = rng.uniform(0, size - extent, 2)
    shape = draw.ellipse if label == 0 else draw.rectangle
    shape((x, y, x + extent * rng.uniform(0.7, 1.0), y + extent), fill=colours[3])
    return image


def write_images(folder: Path, count: int, size: int, suffix: str) -> tuple[list[str], list[int]]:
    """`count` images, classes alternating, named so that sorting the folder gives back this order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = [i % 2 for i in range(count)]
    paths = [str(folder / f"{i:06d}_{label}{suffix}") for i, label in enumerate(labels)]
    for path, label in zip(paths, labels, strict=True):
        make_image(rng, label, size).save(path)
    return paths, labels


def machine_info() -> dict:
    """The machine beside every figure: CPU model and the instruction sets that change the numbers."""
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu.cpu_model(), "isa": cpu.isa_summary(),
            "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__, "timm": timm.__version__,
            "load_average_before": os.getloadavg()}


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(cell) for cell in cells) + " |" for cells in rows]
