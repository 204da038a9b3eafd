"""From a user's path to a labelled, split list of samples: three layouts, bad files skipped with reasons
(never a crash), problems the user must fix as one-line UserErrors, seeded splits independent of listing order."""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import groupby
from operator import attrgetter
from pathlib import Path

from transferkit.data import remote
from transferkit.data.boxes import BOX_COLUMNS, Box, parse_box
from transferkit.data.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    VALIDATION_SCALE,
    has_image_extension,
    load_rgb,
    scale_for,
)
from transferkit.data.labelsets import canonical_label_set, is_label_set, label_set
from transferkit.data.members import looks_packed
from transferkit.data.tables import read_rows, row_file, row_problem
from transferkit.errors import UnreadableImage, UserError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
VAL_FOLDERS = ("val", "valid", "validation")


@dataclass(frozen=True)
class Sample:
    """One usable image."""

    path: str  # absolute path
    label: str  # a class, or in a multi-label index a canonical label set (`a|b`)
    split: str  # "train" | "val" | "test"
    box: Box | None = None  # the region to crop right after decoding (CSV x1,y1,x2,y2 columns)


@dataclass(frozen=True)
class Skipped:
    """A file (or hidden folder, or CSV row) left out, and why, so nothing disappears silently."""

    path: str
    reason: str


@dataclass
class DatasetIndex:
    """Everything a training run needs to know about its data before touching a pixel."""

    root: str
    classes: list[str]
    samples: list[Sample]
    skipped: list[Skipped]
    layout: str  # "splits" | "classes" | "csv" | "shards" (paths are then `SHARD.tar::MEMBER` references)
    seed: int = 0
    multilabel: bool = False  # CSV labels with `|`: `classes` are the single labels, a sample's label is a set

    def labels_of(self, sample: Sample) -> tuple[str, ...]:
        """The classes a sample belongs to: one, or a multi-label sample's set."""
        return label_set(sample.label) if self.multilabel else (sample.label,)

    def split(self, name: str) -> list[Sample]:
        """Samples of one split ("train", "val" or "test"), in index order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """split -> class -> number of samples, zeros included, for reports and imbalance checks."""
        tally = Counter((s.split, label) for s in self.samples for label in self.labels_of(s))
        return {sp: {c: tally[sp, c] for c in self.classes} for sp in SPLITS}

    def split_json(self) -> dict:
        """The split as plain JSON data, saved next to a run so it can be audited or reproduced."""
        out: dict = {sp: [s.path for s in self.split(sp)] for sp in SPLITS}
        out["labels"] = {sp: [s.label for s in self.split(sp)] for sp in SPLITS}
        if any(s.box for s in self.samples):  # so a run trained on crops is re-evaluated (and exported) on them
            out["boxes"] = {sp: [s.box and s.box.to_list() for s in self.split(sp)] for sp in SPLITS}
        out.update(seed=self.seed, layout=self.layout)
        return out


@dataclass(frozen=True)
class _Entry:
    """A candidate image before verification; ``split`` is None until the seeded split assigns one."""

    path: str
    label: str
    split: str | None
    box: Box | None = None


@dataclass
class _Found:
    """What a layout reader collected: candidates, skips, every declared class, and splits given as folders."""

    entries: list[_Entry] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    declared: set[str] = field(default_factory=set)
    explicit: set[str] = field(default_factory=set)
    multilabel: bool = False


def scan_dataset(
    path: str | os.PathLike[str],
    val_split: float = 0.2,
    test_split: float = 0.0,
    seed: int = 0,
    verify: bool = True,
    max_pixels: int = MAX_PIXELS,
    trainable: bool = True,
) -> DatasetIndex:
    """Index a dataset folder or CSV: find images, skip bad files with reasons, and split them.

    A folder written by `transferkit pack` is read from its index (split as packed; fractions and seed ignored).
    Split folders and CSV split values are kept. Other images get a seeded per-class (stratified) split;
    val (test) is carved from them only when the layout has no val (test) folder of its own.
    ``trainable=False`` (data checks) indexes data that could not train yet (one class, a class with one image);
    only "no images at all" is then an error.
    """
    check_fractions(val_split, test_split)
    if remote.is_url(path):  # only packed datasets live at a URL: their index lists every image
        from transferkit.data.shards import shard_dataset  # noqa: PLC0415 - shards builds on this module

        return shard_dataset(os.fspath(path).rstrip("/"))
    root = existing_root(path)
    if root.is_dir() and looks_packed(root):  # `transferkit pack` output: its split is frozen, its images verified
        from transferkit.data.shards import shard_dataset  # noqa: PLC0415 - shards builds on this module

        return shard_dataset(root)
    layout, found = _read_layout(root)
    entries, bad = _verify(found.entries, max_pixels) if verify else (found.entries, [])
    skipped = sorted(found.skipped + bad, key=lambda s: s.path)
    labels_of = label_set if found.multilabel else lambda label: (label,)
    _check_classes(root, entries, found.declared, skipped, trainable, labels_of)
    fractions = (0.0 if "val" in found.explicit else val_split, 0.0 if "test" in found.explicit else test_split)
    samples = _assign_splits(entries, *fractions, seed)
    samples.sort(key=lambda s: (SPLITS.index(s.split), s.label, s.path))
    return DatasetIndex(str(root), sorted(found.declared), samples, skipped, layout, seed, found.multilabel)


def existing_root(path: str | os.PathLike[str]) -> Path:
    """The absolute local folder or file that `path` names; one line when there is none."""
    root = Path(os.path.abspath(os.path.expanduser(path)))
    if not root.exists():
        raise UserError(f"path does not exist: {root}")
    return root


def check_data_path(path: str | os.PathLike[str]) -> None:
    """What a command can check of its DATA before importing PyTorch: a local path exists (a URL is read later)."""
    if not remote.is_url(path):
        existing_root(path)


def check_fractions(val_split: float, test_split: float) -> None:
    """Reject split fractions that would leave no training or no validation data."""
    if not 0 < val_split < 1:
        raise UserError(f"bad val_split {val_split}: must be between 0 and 1 (exclusive)")
    if not 0 <= test_split < 1:
        raise UserError(f"bad test_split {test_split}: must be at least 0 and below 1")
    if val_split + test_split >= 1:
        raise UserError(f"val_split + test_split is {val_split + test_split:g}: must be below 1 to leave training data")


def _read_layout(root: Path) -> tuple[str, _Found]:
    """Pick the layout from what the path is and holds."""
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise UserError(f"expected a folder of images or a .csv file, got: {root}")
        return "csv", _read_csv(root)
    if (root / "train").is_dir():
        return "splits", _read_split_folders(root)
    found = _Found()
    _read_class_folders(root, None, found)
    return "classes", found


def _read_split_folders(root: Path) -> _Found:
    """train/ + optional val/ (valid/, validation/) and test/ of class folders; train stays unsplit (None)."""
    val_dirs = [name for name in VAL_FOLDERS if (root / name).is_dir()]
    if len(val_dirs) > 1:
        raise UserError(f"{root} has more than one validation folder ({', '.join(val_dirs)}); keep only one")
    used: dict[str, str | None] = {"train": None, **{name: "val" for name in val_dirs}}
    if (root / "test").is_dir():
        used["test"] = "test"
    found = _Found(explicit={sp for sp in used.values() if sp})
    _, dirnames, filenames = next(_sorted_walk(root, found.skipped))
    strays = [os.path.join(root, n) for n in dirnames + filenames if n not in used]
    found.skipped += [Skipped(path, "not in a train/val/test folder") for path in strays]
    for name, split in used.items():
        _read_class_folders(root / name, split, found)
    return found


def _read_class_folders(folder: Path, split: str | None, found: _Found) -> None:
    """Add one subfolder per class (nested folders below it allowed) to ``found``; stray files are skipped."""
    for dirpath, dirnames, filenames in _sorted_walk(folder, found.skipped):
        top = dirpath == os.fspath(folder)
        if top:
            found.declared.update(dirnames)
        label = os.path.relpath(dirpath, folder).split(os.sep)[0]
        for name in filenames:
            full = os.path.join(dirpath, name)
            if top:
                found.skipped.append(Skipped(full, "not in a class folder"))
            elif not has_image_extension(name):
                found.skipped.append(Skipped(full, "not an image extension"))
            else:
                found.entries.append(_Entry(full, label, split))


# Folders that archivers, NAS boxes and Windows add beside a user's own: never a class.
MIN_CLASS_IMAGES = 2  # a class with fewer cannot have an image in training and one held out
SYSTEM_FOLDERS = frozenset({"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information"})


def _sorted_walk(folder: Path, skipped: list[Skipped]) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` in name order, independent of the filesystem; hidden entries and unreadable or
    already-visited (symlink loop) folders are recorded in ``skipped`` and never entered."""
    seen: set[str] = set()

    def unreadable(exc: OSError) -> None:
        skipped.append(Skipped(str(exc.filename), f"cannot read: {exc.strerror}"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        if os.path.realpath(dirpath) in seen:
            skipped.append(Skipped(dirpath, "same folder as one already scanned (symlink)"))
            dirnames.clear()
            continue
        seen.add(os.path.realpath(dirpath))
        for names, kind in ((dirnames, "hidden folder"), (filenames, "hidden file")):
            skipped.extend(Skipped(os.path.join(dirpath, n), kind) for n in sorted(names) if n.startswith("."))
            names[:] = sorted(n for n in names if not n.startswith("."))
        skipped.extend(Skipped(os.path.join(dirpath, n), "system folder") for n in dirnames if n in SYSTEM_FOLDERS)
        dirnames[:] = [n for n in dirnames if n not in SYSTEM_FOLDERS]
        yield dirpath, dirnames, filenames


def _read_csv(csv_path: Path) -> _Found:
    """``path,label[,split][,x1,y1,x2,y2]`` rows with a header; relative paths are relative to the CSV's folder.
    Labels holding `|` make the index multi-label; box columns crop each image to its row's box."""
    found, seen = _Found(), set()
    with_boxes, rows = read_rows(csv_path)
    found.multilabel = any(is_label_set(row["label"]) for _, row in rows)
    for line, row in rows:
        where, raw_path, split = f"{csv_path}:{line}", row["path"], row["split"]
        full = row_file(csv_path.parent, raw_path)
        label = canonical_label_set(row["label"], where) if found.multilabel and row["label"] else row["label"]
        if label:
            found.declared.update(label_set(label) if found.multilabel else (label,))
        box, reason = parse_box([row[c] for c in BOX_COLUMNS]) if with_boxes else (None, None)
        reason = row_problem(raw_path, label, full, (full, box), seen) or reason
        if reason:
            found.skipped.append(Skipped(full if raw_path else where, reason))
            continue
        if split and split.lower() not in SPLIT_ALIASES:
            raise UserError(f"{where}: unknown split '{split}' (use train, val, valid, validation or test)")
        seen.add((full, box))
        found.entries.append(_Entry(full, label, SPLIT_ALIASES.get(split.lower()), box))
    named = {e.split for e in found.entries if e.split}
    if "train" in named and "val" not in named:  # as a train/ folder without val/: validation comes from train rows
        found.entries = [replace(e, split=None) if e.split == "train" else e for e in found.entries]
        found.explicit = named - {"train"}
    return found


def _no_images_message(root: Path, skipped: list[Skipped]) -> str:
    """Why nothing was found, in terms of the layout expected: images lying loose in the folder are not "skipped"
    as broken, they are in the wrong place."""
    if root.is_file():  # a CSV: every row was unusable
        return f"no images found in {root} ({len(skipped)} rows skipped" + \
            (f", e.g. {skipped[0].path}: {skipped[0].reason})" if skipped else ")")
    layout = f"put each class's images in a subfolder named after it ({root / 'CLASS' / 'image.jpg'}), or in " \
             "train/CLASS/, val/CLASS/ [test/CLASS/]"
    loose = sum(s.reason == "not in a class folder" and has_image_extension(s.path) for s in skipped)
    if loose:
        return f"no images in class subfolders of {root}: {loose} images lie directly in it; {layout}"
    exts = " ".join(sorted(IMAGE_EXTENSIONS))
    return f"no images found in {root} (looked for {exts} files in class subfolders; {layout})" + \
        (f"; {len(skipped)} other entries passed over" if skipped else "")


def _verify(entries: list[_Entry], max_pixels: int) -> tuple[list[_Entry], list[Skipped]]:
    reasons = image_problems([e.path for e in entries], max_pixels, [e.box for e in entries])
    kept = [e for e, r in zip(entries, reasons, strict=True) if r is None]
    return kept, [Skipped(e.path, r) for e, r in zip(entries, reasons, strict=True) if r is not None]


def image_problems(paths: list[str], max_pixels: int = MAX_PIXELS, boxes: list[Box | None] | None = None
                   ) -> list[str | None]:
    """load_rgb's refusal reason for each path (None when it decodes; a box must fit its image), decoded in
    parallel threads (Pillow releases the GIL); the order is that of ``paths``."""
    boxes = boxes or [None] * len(paths)
    with ThreadPoolExecutor() as pool:
        return list(pool.map(lambda path, box: _unusable_reason(path, max_pixels, box), paths, boxes))


def _unusable_reason(path: str, max_pixels: int, box: Box | None) -> str | None:
    try:
        image = load_rgb(path, max_pixels, scale_for(box, VALIDATION_SCALE))
    except UnreadableImage as exc:
        return str(exc)
    return box.outside(*image.size) if box else None


def list_image_files(folder: Path) -> tuple[list[str], list[Skipped]]:
    """Image files under ``folder`` (recursively, name order, not yet decoded) and what was passed over, why."""
    paths, skipped = [], []
    for dirpath, _, filenames in _sorted_walk(folder, skipped):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if has_image_extension(name):
                paths.append(full)
            else:
                skipped.append(Skipped(full, "not an image extension"))
    return paths, skipped


def _check_classes(root: Path, entries: list[_Entry], declared: set[str], skipped: list[Skipped], trainable: bool,
                   labels_of: Callable[[str], tuple[str, ...]]) -> None:
    """Fail early, naming the problem, when the data cannot train a classifier (not ``trainable``: has no images).
    ``labels_of`` gives an entry's classes: one, or a multi-label entry's set."""
    if not entries:
        raise UserError(_no_images_message(root, skipped))
    if not trainable:
        return
    if len(declared) == 1:
        raise UserError(f"only one class found ('{next(iter(declared))}') in {root}; need at least 2 classes")
    per_class = Counter(label for e in entries for label in labels_of(e.label))
    few = [f"'{c}' has {per_class[c]}" for c in sorted(declared) if per_class[c] < MIN_CLASS_IMAGES]
    if few:
        raise UserError(f"every class needs at least {MIN_CLASS_IMAGES} usable images: {', '.join(few)}")
    # Unsplit images always leave at least one per class in train, so they count as train here.
    trainable = {label for e in entries if e.split in (None, "train") for label in labels_of(e.label)}
    missing = sorted(set(per_class) - trainable)
    if missing:
        raise UserError(f"classes in val/test missing from train: {', '.join(missing)}")


def _assign_splits(entries: list[_Entry], val_f: float, test_f: float, seed: int) -> list[Sample]:
    """Give unsplit entries a seeded, per-class split (a multi-label entry's class: its whole label set); entries
    with an explicit split keep it."""
    samples = [Sample(e.path, e.label, e.split, e.box) for e in entries if e.split is not None]
    unsplit = sorted((e for e in entries if e.split is None), key=_entry_order)  # listing order is irrelevant
    for label, group in groupby(unsplit, key=attrgetter("label")):
        samples += _split_class(label, list(group), val_f, test_f, seed)
    return samples


def _entry_order(entry: _Entry) -> tuple[str, str, str]:
    return entry.label, entry.path, entry.box.key() if entry.box else ""


def _split_class(label: str, entries: list[_Entry], val_f: float, test_f: float, seed: int) -> list[Sample]:
    """Seeded shuffle of one class, cut per-class-rounded: ≥ 1 val/test where asked, ≥ 1 always left in train."""
    n = len(entries)
    n_val = max(1, math.floor(n * val_f + 0.5)) if val_f > 0 else 0
    n_test = max(0, min(max(1, math.floor(n * test_f + 0.5)) if test_f > 0 else 0, n - 1 - n_val))
    n_val = min(n_val, n - 1 - n_test)
    shuffled = list(entries)
    random.Random(f"{seed}/{label}").shuffle(shuffled)
    splits = ["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
    return [Sample(e.path, label, sp, e.box) for e, sp in zip(shuffled, splits, strict=True)]
