"""Speed on an accelerator: Lite0 extraction, fine-tuning and inference with and without AMP + channels_last, and
whether the image loader keeps the device busy. Runs on CPU too (`--device cpu --quick`), as a check of the script.

    .venv/bin/python bench/gpu_speed.py                          # CUDA, 2,048 generated images
    .venv/bin/python bench/gpu_speed.py --device cpu --quick     # the CPU-only part of bench/gpu_check.sh
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch
from measure import machine_info, table, write_images  # bench/: run as a script, no package

from transferkit.data.loader import ImageDataset, make_loader
from transferkit.data.transforms import Preprocess, eval_transform
from transferkit.models.classifier import HeadSpec, new_classifier, unfreeze
from transferkit.models.registry import create_imagenet_model, get_backbone

RESULTS = Path(__file__).parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype) if amp else contextlib.nullcontext()


def extraction(model, loader, device: torch.device, amp: bool) -> dict:
    """Images/s from files through the frozen network, and the share of the time spent waiting for the loader."""
    model.eval()
    waited, images, start = 0.0, 0, time.perf_counter()
    batches = iter(loader)
    while True:
        before = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - before
        if batch is None:
            break
        pixels = batch[0].to(device, non_blocking=True).to(memory_format=torch.channels_last if amp else
                                                             torch.contiguous_format)
        with torch.no_grad(), autocast(device, amp):
            model.embed(pixels)
        images += len(pixels)
    sync(device)
    seconds = time.perf_counter() - start
    return {"img_s": images / seconds, "loader_wait": waited / seconds}


def steps(model, pixels: torch.Tensor, device: torch.device, amp: bool, count: int, train: bool) -> float:
    """Images/s of `count` training steps (top 3 blocks unfrozen) or inference passes on one batch."""
    memory = torch.channels_last if amp else torch.contiguous_format
    model = model.to(memory_format=memory)
    pixels = pixels.to(device).to(memory_format=memory)
    targets = torch.zeros(len(pixels), 1, device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4) if train else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    model.train(train)
    for step in range(count + 1):  # the first pass warms up (cuDNN autotuning, allocator)
        if step == 1:
            sync(device)
            start = time.perf_counter()
        with torch.set_grad_enabled(train), autocast(device, amp):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(pixels).float(), targets)
        if train:
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    sync(device)
    return count * len(pixels) / (time.perf_counter() - start)


def measure(args: argparse.Namespace, folder: Path) -> list[dict]:
    device = torch.device(args.device)
    spec = get_backbone("tf_efficientnet_lite0")
    imagenet, _ = create_imagenet_model(spec)
    model = new_classifier(imagenet, 1, HeadSpec()).to(device)
    unfreeze(model, 3)
    paths, labels = write_images(folder, args.images, 256, ".jpg")
    pre = Preprocess.for_model(imagenet)
    loader = make_loader(ImageDataset(paths, labels, eval_transform(pre)), args.batch, args.workers)
    if device.type == "cuda":
        loader.pin_memory = True
    pixels = torch.rand(args.batch, 3, pre.image_size, pre.image_size)
    rows = []
    for amp in (False, True):
        label = "AMP + channels_last" if amp else "fp32 NCHW"
        rows.append({"measurement": "extraction from files", "variant": label,
                     **extraction(model, loader, device, amp)})
        rows.append({"measurement": f"fine-tune step, batch {args.batch}", "variant": label,
                     "img_s": steps(model, pixels, device, amp, args.steps, train=True)})
        rows.append({"measurement": f"inference, batch {args.batch}", "variant": label,
                     "img_s": steps(model, pixels, device, amp, args.steps, train=False)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of this script")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.workers, args.steps = 32, 8, 1, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --device cpu")
    with tempfile.TemporaryDirectory() as folder:
        rows = measure(args, Path(folder))
    machine = {**machine_info(), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    print(f"# {machine['device']} ({machine['cpu']}, {machine['isa']})")
    print("\n".join(table(["measurement", "variant", "img/s", "loader wait"],
                          [[r["measurement"], r["variant"], f"{r['img_s']:.1f}",
                            f"{r['loader_wait']:.0%}" if "loader_wait" in r else ""] for r in rows])))
    out = args.out or RESULTS / f"gpu_speed-{args.device}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                              indent=1))


if __name__ == "__main__":
    main()
