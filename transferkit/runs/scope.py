"""What `evaluate` scores: which images of the data it was handed, what that split's role was in training, and which
of them are byte-identical copies of training images (a score over those is a memory test, not a generalisation
figure)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.data.content import file_digest, group_by_content
from transferkit.data.members import is_shard_member
from transferkit.data.sources import SPLITS, DatasetIndex, Sample
from transferkit.options import check_evaluated_split
from transferkit.progress import Reporter

ROLES = {
    "test": "held out: never used in training",
    "val": "also used to pick the best epoch, so it flatters the model",
    "train": "the images the model was trained on",
}


@dataclass
class Scope:
    """The evaluated samples, what they are (`note`, one line for the console) and the rows that leaked."""

    split: str
    samples: list[Sample]
    note: str
    leaked: list[int] | None = None  # rows of `samples` copied from training; None: not checked
    leak_note: str = ""


def is_own_data(run_folder: Path, index: DatasetIndex) -> bool:
    """The data the run was trained on: same root, and the same files in each split as its split.json."""
    try:
        saved = json.loads((run_folder / "split.json").read_text())
    except (OSError, ValueError):
        return False
    own = index.split_json()
    return saved.get("root") == index.root and all(saved.get(s) == own[s] for s in SPLITS)


def choose_scope(index: DatasetIndex, split: str | None, own: bool) -> Scope:
    """The user's split, else test (or val) of the run's own data, else every image: data the run was not trained
    on is scored whole, since its train/val split would be a fresh one of no meaning to this run."""
    check_evaluated_split(split)
    total = len(index.samples)
    if split is None and not own:
        return Scope("all", index.samples, f"all {total} images: {index.root} is not the data this run was "
                                            "trained on (--split to score one split of it)")
    split = split or ("test" if index.split("test") else "val")
    if split == "all":
        whose = ", its training images included" if own else ""
        return Scope("all", index.samples, f"all {total} images of {index.root}, as asked{whose}")
    samples = index.split(split)
    why = ROLES[split] if own else "as asked; this is not the run's own split of it"
    return Scope(split, samples, f"{split} split, {len(samples)} of {total} images: {why}")


def check_leaks(scope: Scope, index: DatasetIndex, run_folder: Path, own: bool) -> None:
    """Fill in `scope.leaked`: the evaluated images whose bytes equal a training image's, by content digest (the
    feature cache's). Skipped where training images are evaluated on purpose, or where they can no longer be read."""
    if own and scope.split in ("train", "all"):
        scope.leak_note = "not checked: the evaluated images include the training split"
        return
    train = [s.path for s in index.split("train")] if own else saved_train_paths(run_folder)
    readable = [path for path in train if is_shard_member(path) or Path(path).is_file()]
    if not readable:
        scope.leak_note = "not checked: the run's training images are not readable from here"
        return
    scope.leaked = leaked_rows([s.path for s in scope.samples], readable)


def saved_train_paths(run_folder: Path) -> list[str]:
    try:
        return json.loads((run_folder / "split.json").read_text()).get("train", [])
    except (OSError, ValueError):
        return []


def leaked_rows(evaluated: list[str], train: list[str]) -> list[int]:
    """Rows of `evaluated` with the same content as some file of `train` (doctor's exact-duplicate grouping)."""

    groups = group_by_content([file_digest(path) for path in train + evaluated])
    # train rows come first, so a group holds a training image exactly when its first row is one
    return sorted(row - len(train) for rows in groups if rows[0] < len(train) for row in rows if row >= len(train))


def leak_record(scope: Scope, kept: np.ndarray, hits: np.ndarray) -> dict:
    """metrics.json's `leaked_from_train` (count, accuracy with and without the copies, whether they were left out
    and which they are), or null with `leak_check` saying why it was not checked. `hits`: each image right or not."""
    if scope.leaked is None:
        return {"leaked_from_train": None, "leak_check": scope.leak_note}
    clean = np.ones(len(hits), dtype=bool)
    clean[scope.leaked] = False
    return {"leaked_from_train": {
        "count": len(scope.leaked),
        "of": len(hits),
        "accuracy_with": float(hits.mean()),
        "accuracy_without": float(hits[clean].mean()) if clean.any() else None,
        "dropped": not kept.all(),
        "files": [scope.samples[row].path for row in scope.leaked],
    }}


def warn_leaks(metrics: dict, reporter: Reporter) -> None:
    """One line when evaluated images are byte-identical copies of training images: the figure flatters the model."""
    leaked = metrics.get("leaked_from_train")
    if not leaked or not leaked["count"]:
        return
    without = leaked["accuracy_without"]
    accuracy = f"accuracy without them {without:.4f}" if without is not None else "none is left without them"
    action = "left out (--drop-leaks)" if leaked["dropped"] else \
        f"counted; {accuracy}, with them {leaked['accuracy_with']:.4f} (--drop-leaks leaves them out)"
    scored = "" if metrics["split"] == "all" else f" {metrics['split']}"  # "all" is every image of another folder
    copies = "is a copy of a training image" if leaked["count"] == 1 else "are copies of training images"
    reporter.warn(f"{leaked['count']} of the {leaked['of']}{scored} images {copies}: {action}")
