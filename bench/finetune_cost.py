"""What each fine-tuning option of issue 19 costs per epoch (decision 0270): seconds per fine-tuning epoch, whole
(training, validation, the EMA's second validation), with and without each option, side by side in one run.

A tiny timm network (test_efficientnet, seeded random weights: the cost, not the accuracy, is measured) at 64 px on
generated images (bench/measure.py), batch 8, 0 loader workers, `--repeats` rounds with the rows in a rotated
order; the table gives each row's median over rounds and epochs and its ratio to the baseline's.

    python bench/finetune_cost.py                  # 3 rounds, 3 fine-tuning epochs, 160 images
    python bench/finetune_cost.py --repeats 5 --out bench/results/finetune-cost.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

import timm
import torch
from measure import machine_info, table, write_images
from safetensors.torch import save_file

from transferkit import api
from transferkit.training.callbacks import Callback

ROWS = {
    "baseline": {},
    "ema": {"ema_decay": 0.998},
    "llrd": {"layer_decay": 0.8},
    "mixup": {"mixup": 0.2},
    "cutmix": {"cutmix": 1.0},
    "randaug": {"augment": "randaugment"},
    "light (today's default)": {"augment": "light"},
    "sampler": {"class_balance": "sampler"},
    "weights": {"class_balance": "weights"},
}
BASE = {"backbone": "test_efficientnet", "image_size": 64, "batch_size": 8, "workers": 0, "epochs_frozen": 1,
        "augment": "none", "unfreeze": "all", "patience": 0, "quiet": True}


class EpochClock(Callback):
    """Wall seconds of each fine-tuning epoch, from its start to the end of every after_epoch callback before it."""

    order = 100

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.last = 0.0

    def before_stage(self, trainer, stage) -> None:
        self.last = time.perf_counter()

    def after_epoch(self, trainer, log) -> None:
        now = time.perf_counter()
        if log.stage == "finetune":
            self.seconds.append(now - self.last)
        self.last = now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=160)
    # 1 by default: on shared, oversubscribed cores two OpenMP threads spin-wait (measured here: 12-28 s per epoch
    # with 2 threads at load 11, 1 s with 1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "finetune-cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seconds: dict[str, list[float]] = {row: [] for row in ROWS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths, labels = write_images(root / "flat", args.images, 64, ".png")
        for path, label in zip(paths, labels, strict=True):  # class folders for `train`
            (root / "data" / f"class_{label}").mkdir(parents=True, exist_ok=True)
            Path(path).rename(root / "data" / f"class_{label}" / Path(path).name)
        torch.manual_seed(0)
        weights = root / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in timm.create_model("test_efficientnet").state_dict().items()},
                  str(weights))
        names = list(ROWS)
        for repeat in range(args.repeats):
            for row in names[repeat % len(names):] + names[:repeat % len(names)]:  # rotated: drift spreads out
                clock = EpochClock()
                api.train(root / "data", root / f"{row}-{repeat}", callbacks=[clock], cache_dir=str(root / "cache"),
                          weights=str(weights), epochs_finetune=args.epochs, **{**BASE, **ROWS[row]})
                seconds[row] += clock.seconds
                print(f"round {repeat + 1}: {row} {[round(s, 3) for s in clock.seconds]}", flush=True)
    base = median(seconds["baseline"])
    rows = [[row, f"{median(values):.3f}", f"{median(values) / base:.2f}x", len(values)]
            for row, values in seconds.items()]
    print("\n".join(table(["option", "s / fine-tuning epoch (median)", "vs baseline", "epochs"], rows)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                    "machine": machine_info(), "settings": {**BASE, "images": args.images,
                                                                            "threads": args.threads},
                                    "seconds": seconds}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
