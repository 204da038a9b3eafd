"""Sharded datasets: generate N small JPEGs, `pack` them, stream one epoch of the train split through `ShardStream`
(DataLoader, 2 workers, the eval transform at 224 px) and watch memory while it streams; the same epoch read as loose
files (`ImageDataset`, shuffled random access) runs beside it for reference.

Memory is the whole process tree (this process and its loader workers), sampled 5 times a second from
/proc/PID/smaps_rollup: PSS (shared pages split between the processes that share them, so forked workers are not
counted twice) and the largest single RSS. Each image count runs in its own process, so one count's peak never shows
in another's row; the loose-file epoch runs after the stream in that process. A flat stream shows the same PSS in
every quarter of the epoch and about the same peak for 10k and 50k images, apart from what every dataset costs per
image (the parsed index, Sample objects, member locations: ~1.8 KB an image in the main process, measured). Batches
in flight (2 per worker, 38 MB each at 224 px) make single samples jump by ~100 MB: the table gives medians per
quarter. CPU ms per image (this process and its workers, user + system) is less sensitive to other load on a
shared machine than img/s.

    .venv/bin/python bench/shards.py                          # 20,000 images
    .venv/bin/python bench/shards.py --images 10000,20000,50000
    .venv/bin/python bench/shards.py --images 2000 --out /tmp/shards.json   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from transferkit.data.loader import ImageDataset, labelled_split
from transferkit.data.shards import pack
from transferkit.data.sources import scan_dataset
from transferkit.data.stream import stream_loader
from transferkit.data.transforms import Preprocess, eval_transform
from transferkit.progress import Reporter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import machine_info  # noqa: E402 - bench/ is not a package
from procs import process_tree  # noqa: E402

PREPROCESS = Preprocess(224, "bicubic", 0.875, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # tf_efficientnet_lite0's


def make_images(folder: Path, count: int, size: int, classes: int = 10, seed: int = 0) -> int:
    """`count` JPEGs (size x size, a class-coloured square on a smooth noisy background) in class folders; bytes."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (classes, 3))
    total = 0
    for i in range(count):
        label = i % classes
        pixels = np.clip(rng.normal(110, 25, (size // 4, size // 4, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels).resize((size, size), Image.BILINEAR)
        x, y = (int(v) for v in rng.integers(0, size // 2, 2))
        image.paste(tuple(int(c) for c in colours[label]), (x, y, x + size // 3, y + size // 3))
        path = folder / f"class_{label:02d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=85)
        total += path.stat().st_size
    return total


def tree_memory() -> tuple[float, float]:
    """(PSS of this process and its descendants, largest RSS among them), MB."""
    pss, largest = 0, 0
    for pid in process_tree(os.getpid()):
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]  # after the address range line
            fields = dict(line.split(":", 1) for line in lines if ":" in line)
        except OSError:  # exited meanwhile
            continue
        pss += int(fields["Pss"].split()[0])
        largest = max(largest, int(fields["Rss"].split()[0]))
    return pss / 1024, largest / 1024


class Sampler:
    """Samples tree_memory every `period` seconds with how far the epoch has got, in a thread."""

    def __init__(self, total: int, period: float = 0.2) -> None:
        self.total, self.period, self.done, self.samples = total, period, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append((self.done / self.total, *tree_memory()))

    def summary(self) -> dict:
        """Median PSS in each quarter of the epoch (batches in flight make single samples jump by ~100 MB), and the
        peaks."""
        quarters = {}
        for q in range(4):
            inside = [s[1] for s in self.samples if q / 4 <= s[0] < (q + 1) / 4 or (q == 3 and s[0] >= 1)]
            quarters[f"{25 * q}-{25 * q + 25}%"] = round(float(np.median(inside)), 1) if inside else None
        return {"pss_mb_median_by_quarter": quarters, "peak_pss_mb": round(max(s[1] for s in self.samples), 1),
                "peak_rss_largest_process_mb": round(max(s[2] for s in self.samples), 1),
                "samples": [[round(v, 3) for v in s] for s in self.samples]}


def epoch(loader, total: int) -> dict:
    """One pass over `loader`, timed, with memory sampled throughout."""
    start, cpu = time.perf_counter(), own_cpu()
    seen = 0
    with Sampler(total) as sampler:
        for images, _ in loader:
            seen += images.shape[0]
            sampler.done = seen
            if seen >= total:  # the last batch, workers still alive
                sampler.samples.append((1.0, *tree_memory()))
    seconds = time.perf_counter() - start
    # The exhausted iterator has joined its workers: their CPU time is in os.times' children figures now.
    cpu_ms = 1000 * (own_cpu() - cpu) / max(seen, 1)
    return {"images": seen, "seconds": round(seconds, 2), "img_per_s": round(seen / seconds, 1),
            "cpu_ms_per_image": round(cpu_ms, 2), **sampler.summary()}


def measure(count: int, args: argparse.Namespace) -> dict:
    """Everything for one image count (run in a fresh process)."""
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        data, out = Path(tmp) / "images", Path(tmp) / "shards"
        start = time.perf_counter()
        jpeg_bytes = make_images(data, count, args.size)
        generated = time.perf_counter() - start
        start = time.perf_counter()
        summary = pack(data, out, args.shard_size, seed=0, reporter=Reporter(quiet=True))
        packed = time.perf_counter() - start
        transform = eval_transform(PREPROCESS)
        baseline = tree_memory()[0]
        index = scan_dataset(out)
        train = labelled_split(index, "train", 0.0)
        loader = stream_loader(train, "train", transform, args.batch_size, args.workers, seed=0,
                               shuffle_buffer=args.buffer)
        streamed = epoch(loader, len(train.paths))
        loose = labelled_split(scan_dataset(data, verify=False), "train", 0.0)  # the same split (no bad files)
        order = torch.randperm(len(loose.paths), generator=torch.Generator().manual_seed(0)).tolist()
        files = epoch(DataLoader(ImageDataset(loose.paths, loose.targets, transform), args.batch_size, sampler=order,
                                 num_workers=args.workers), len(loose.paths))
    return {"images": count, "train_images": len(train.paths), "jpeg_mb": round(jpeg_bytes / 1e6, 1),
            "generate_s": round(generated, 1), "pack_s": round(packed, 1), "pack_img_per_s": round(count / packed, 1),
            "shards": summary["shards"], "shard_mb": round(summary["bytes"] / 1e6, 1),
            "pss_mb_before_stream": round(baseline, 1), "stream": streamed, "loose_files": files}


def cpu_busy() -> float:
    """CPU-seconds the whole machine has been busy (all but idle and iowait)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: nproc {m['nproc']}, {m['cpu']} ({m['isa']}), torch {m['torch']}; other processes kept "
             f"{m['other_processes_cores']:.1f} of {m['nproc']} cores busy on average (load average before -> after "
             f"{m['load_before']:.1f} -> {m['load_after']:.1f}). {results['settings']}", "",
             "| Images (train) | JPEG MB | Pack s (img/s) | Shards | Stream img/s (CPU ms/img) | "
             "Loose files img/s (CPU ms/img) | "
             "Stream PSS MB, median per quarter of the epoch | Stream peak PSS | Largest process RSS | "
             "Loose peak PSS |",
             "|" + "---|" * 10]
    for r in results["runs"]:
        s, f = r["stream"], r["loose_files"]
        quarters = " / ".join("-" if v is None else f"{v:.0f}" for v in s["pss_mb_median_by_quarter"].values())
        lines.append(f"| {r['images']} ({r['train_images']}) | {r['jpeg_mb']} | {r['pack_s']} ({r['pack_img_per_s']}) "
                     f"| {r['shards']} | {s['img_per_s']} ({s['cpu_ms_per_image']}) | "
                     f"{f['img_per_s']} ({f['cpu_ms_per_image']}) | "
                     f"{quarters} | {s['peak_pss_mb']:.0f} | "
                     f"{s['peak_rss_largest_process_mb']:.0f} | {f['peak_pss_mb']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="20000", help="comma-separated image counts, one process each")
    parser.add_argument("--size", type=int, default=96, help="side of the generated JPEGs in pixels")
    parser.add_argument("--shard-size", type=int, default=16_000_000, help="bytes per shard")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--buffer", type=int, default=1000, help="shuffle buffer (samples)")
    parser.add_argument("--tmp", default=None, help="folder for the generated data (default: the system's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "shards.json")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one count, print JSON
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    info = {**machine_info(), "load_before": os.getloadavg()[0]}
    busy, own, start = cpu_busy(), own_cpu(), time.perf_counter()
    runs = []
    for count in (int(c) for c in args.images.split(",")):
        command = [sys.executable, str(Path(__file__).resolve()), "--one", str(count), *_passed_on(args)]
        print(f"{count} images...", file=sys.stderr, flush=True)
        out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - start
    info.update(load_after=os.getloadavg()[0],
                other_processes_cores=max(0.0, (cpu_busy() - busy) - (own_cpu() - own)) / wall)
    settings = (f"{args.size} px JPEGs, shards of {args.shard_size / 1e6:g} MB, batch {args.batch_size}, "
                f"{args.workers} workers, shuffle buffer {args.buffer}, eval transform at 224 px.")
    results = {"machine": info, "settings": settings, "wall_seconds": round(wall, 1), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(markdown(results))


def _passed_on(args: argparse.Namespace) -> list[str]:
    passed = ["--size", str(args.size), "--shard-size", str(args.shard_size), "--workers", str(args.workers),
              "--batch-size", str(args.batch_size), "--buffer", str(args.buffer)]
    return passed + (["--tmp", args.tmp] if args.tmp else [])


if __name__ == "__main__":
    main()
