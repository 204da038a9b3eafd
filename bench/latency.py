"""Everyday latency, as a user feels it: each command is a fresh process, timed from start to answer.

    .venv/bin/python bench/latency.py            # 500 generated images, 3 repeats of each command
    .venv/bin/python bench/latency.py --quick    # a smoke test of this script
    .venv/bin/python bench/latency.py --train-only --repeats 2   # the frozen-only train rows and the plain loop

Rows: `--help`; `predict` of one image with an ONNX export and with PyTorch; `serve` from start to its first
answer (export); a frozen-only `train` (Lite0, 20 head epochs) with a cold and a warm feature cache; and, in the
same run, the plain loop it replaces (eager PyTorch recomputing the features every epoch; one epoch timed and
multiplied by the epoch count). Writes bench/results/latency.json with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import free_port  # noqa: E402 - bench/ is not a package
from measure import machine_info, table, write_images  # noqa: E402

RESULTS = Path(__file__).parent / "results"
EPOCHS = 20


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "transferkit", *argv], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def serve_first_answer(run: Path, image: Path, env: dict) -> float:
    """Seconds from starting `serve` to its first prediction of one image."""
    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "transferkit", "serve", str(run), "--port", str(port),
                               "--engine", "onnx", "--no-access-log"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    body, boundary = image.read_bytes(), "latencybench"
    payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{image.name}\"\r\n"
               f"Content-Type: image/jpeg\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    try:
        while time.perf_counter() - start < 120:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=payload,
                                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    json.load(response)
                return time.perf_counter() - start
            except OSError:
                time.sleep(0.05)
        raise SystemExit("serve gave no answer within 120 s")
    finally:
        server.terminate()
        server.wait()


def plain_loop_seconds(paths: list[str], labels: list[int], epochs: int) -> float:
    """The recompute-every-epoch loop (eager fp32, no workers): one epoch timed, times `epochs`, plus its imports."""
    code = f"""
import time; start = time.perf_counter()
import torch, timm
from transferkit.data.loader import ImageDataset, make_loader
from transferkit.data.transforms import Preprocess, eval_transform
from transferkit.models.registry import create_imagenet_model, get_backbone
model, _ = create_imagenet_model(get_backbone("tf_efficientnet_lite0")); model.eval()
head = torch.nn.Linear(model.num_features, 1); opt = torch.optim.AdamW(head.parameters(), 1e-3)
paths, labels = {paths!r}, {labels!r}
loader = make_loader(ImageDataset(paths, labels, eval_transform(Preprocess.for_model(model))), 32, 0)
setup = time.perf_counter() - start; start = time.perf_counter()
for images, targets in loader:
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(head(features)[:, 0], targets.float())
    opt.zero_grad(); loss.backward(); opt.step()
print(setup + {epochs} * (time.perf_counter() - start))
"""
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, folder: Path) -> dict[str, list[float]]:
    paths, labels = write_images(folder / "data" / "images", args.images, 256, ".jpg")
    data = folder / "data"
    for label in (0, 1):  # class folders, as a user's photos
        (data / f"class_{label}").mkdir(exist_ok=True)
    for path, label in zip(paths, labels, strict=True):
        Path(path).rename(data / f"class_{label}" / Path(path).name)
    (data / "images").rmdir()
    one = next((data / "class_0").iterdir())
    env = {**os.environ, "TRANSFERKIT_CACHE": str(folder / "cache")}
    train = ["train", str(data), "--epochs-frozen", str(EPOCHS), "--epochs-finetune", "0", "--quiet"]
    times: dict[str, list[float]] = {name: [] for name in ("help", "train_cold", "train_warm", "predict_export",
                                                           "predict_torch", "serve_first_answer")}
    if args.train_only:
        times = {"train_cold": [], "train_warm": []}
    for repeat in range(args.repeats):
        env["TRANSFERKIT_CACHE"] = str(folder / f"cache-{repeat}")  # a new, empty cache: cold
        times["train_cold"].append(timed([*train, "--out", str(folder / f"cold-{repeat}")], env))
        times["train_warm"].append(timed([*train, "--out", str(folder / f"warm-{repeat}")], env))
        if args.train_only:
            continue
        times["help"].append(timed(["--help"], env))
        run = folder / f"cold-{repeat}"
        timed(["export", str(run)], env)
        times["predict_export"].append(timed(["predict", str(run), str(one), "--engine", "onnx"], env))
        times["predict_torch"].append(timed(["predict", str(run), str(one), "--engine", "torch"], env))
        times["serve_first_answer"].append(serve_first_answer(run, one, env))
    times["plain_loop"] = [plain_loop_seconds([str(p) for p in sorted(data.rglob("*.jpg"))],
                                              [int(p.parent.name[-1]) for p in sorted(data.rglob("*.jpg"))], EPOCHS)]
    return times


TARGETS = {"help": 0.5, "predict_export": 1.5, "predict_torch": 5.0, "serve_first_answer": 3.0, "train_cold": 15.0,
           "train_warm": 5.0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="40 images, one repeat")
    parser.add_argument("--train-only", action="store_true", help="only the frozen-only train rows and plain loop")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 40, 1
    machine = machine_info()
    with tempfile.TemporaryDirectory() as folder:
        times = measure(args, Path(folder))
    plain = median(times["plain_loop"])
    rows = [[name, f"{median(seconds):.2f}", f"{min(seconds):.2f}-{max(seconds):.2f}",
             f"<= {TARGETS[name]}" if name in TARGETS else "", f"{plain / median(seconds):.1f}x"
             if name.startswith("train") else ""] for name, seconds in times.items()]
    print(f"# {machine['cpu']} ({machine['isa']}), {machine['nproc']} cores; {args.images} images, "
          f"{args.repeats} repeats")
    print("\n".join(table(["command", "median s", "range", "target s", "vs plain loop"], rows)))
    out = args.out or RESULTS / ("latency-quick.json" if args.quick else "latency.json")
    out.write_text(json.dumps({"machine": {**machine, "load_average_after": os.getloadavg()}, "images": args.images,
                               "seconds": times, "targets": TARGETS}, indent=1) + "\n")


if __name__ == "__main__":
    main()
