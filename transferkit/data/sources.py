"""From a user's path to a labelled, split list of samples: three layouts, bad files skipped with reasons
(never a crash), problems the user must fix as one-line UserErrors, seeded splits independent of listing order."""

from __future__ import annotations

import csv
import math
import os
import random
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter
from pathlib import Path

from transferkit.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, has_image_extension, load_rgb
from transferkit.errors import UnreadableImage, UserError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
VAL_FOLDERS = ("val", "valid", "validation")


@dataclass(frozen=True)
class Sample:
    """One usable image."""

    path: str  # absolute path
    label: str
    split: str  # "train" | "val" | "test"


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
    layout: str  # "splits" | "classes" | "csv"
    seed: int = 0

    def split(self, name: str) -> list[Sample]:
        """Samples of one split ("train", "val" or "test"), in index order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """split -> class -> number of samples, zeros included, for reports and imbalance checks."""
        tally = Counter((s.split, s.label) for s in self.samples)
        return {sp: {c: tally[sp, c] for c in self.classes} for sp in SPLITS}

    def split_json(self) -> dict:
        """The split as plain JSON data, saved next to a run so it can be audited or reproduced."""
        out: dict = {sp: [s.path for s in self.split(sp)] for sp in SPLITS}
        out["labels"] = {sp: [s.label for s in self.split(sp)] for sp in SPLITS}
        out.update(seed=self.seed, layout=self.layout)
        return out


@dataclass(frozen=True)
class _Entry:
    """A candidate image before verification; ``split`` is None until the seeded split assigns one."""

    path: str
    label: str
    split: str | None


@dataclass
class _Found:
    """What a layout reader collected: candidates, skips, every declared class, and splits given as folders."""

    entries: list[_Entry] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    declared: set[str] = field(default_factory=set)
    explicit: set[str] = field(default_factory=set)


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

    Split folders and CSV split values are kept. Other images get a seeded per-class (stratified) split;
    val (test) is carved from them only when the layout has no val (test) folder of its own.
    ``trainable=False`` (data checks) indexes data that could not train yet (one class, a class with one image);
    only "no images at all" is then an error.
    """
    _check_fractions(val_split, test_split)
    root = Path(os.path.abspath(os.path.expanduser(path)))
    if not root.exists():
        raise UserError(f"path does not exist: {root}")
    layout, found = _read_layout(root)
    entries, bad = _verify(found.entries, max_pixels) if verify else (found.entries, [])
    skipped = sorted(found.skipped + bad, key=lambda s: s.path)
    _check_classes(root, entries, found.declared, len(skipped), trainable)
    fractions = (0.0 if "val" in found.explicit else val_split, 0.0 if "test" in found.explicit else test_split)
    samples = _assign_splits(entries, *fractions, seed)
    samples.sort(key=lambda s: (SPLITS.index(s.split), s.label, s.path))
    return DatasetIndex(str(root), sorted(found.declared), samples, skipped, layout, seed)


def _check_fractions(val_split: float, test_split: float) -> None:
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
        yield dirpath, dirnames, filenames


def _read_csv(csv_path: Path) -> _Found:
    """``path,label[,split]`` rows with a header; relative paths are relative to the CSV's folder."""
    found, seen = _Found(), set()
    for line, raw_path, label, split in _csv_rows(csv_path):
        where = f"{csv_path}:{line}"
        full = os.path.normpath(os.path.join(csv_path.parent, os.path.expanduser(raw_path)))
        if label:
            found.declared.add(label)
        reason = _csv_row_problem(raw_path, label, full, seen)
        if reason:
            found.skipped.append(Skipped(full if raw_path else where, reason))
            continue
        if split and split.lower() not in SPLIT_ALIASES:
            raise UserError(f"{where}: unknown split '{split}' (use train, val, valid, validation or test)")
        seen.add(full)
        found.entries.append(_Entry(full, label, SPLIT_ALIASES.get(split.lower())))
    return found


def _csv_rows(csv_path: Path) -> list[tuple[int, str, str, str]]:
    """(line, path, label, split) per row, stripped; unreadable or header-less CSVs are UserErrors."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            reader.fieldnames = [(c or "").strip().lower() for c in reader.fieldnames or []]
            if not {"path", "label"} <= set(reader.fieldnames):
                found = ", ".join(c for c in reader.fieldnames if c) or "none"
                raise UserError(f"CSV {csv_path} must have 'path' and 'label' columns in its header; found: {found}")
            cells = ("path", "label", "split")
            return [(reader.line_num, *((row.get(c) or "").strip() for c in cells)) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read CSV {csv_path}: {' '.join(str(exc).split())}") from exc


def _csv_row_problem(raw_path: str, label: str, full: str, seen: set[str]) -> str | None:
    """Why a CSV row cannot be used, short of decoding its file; None when it can."""
    if not raw_path or not label:
        return "row without path or label"
    if full in seen:
        return "listed twice in CSV"
    if not os.path.isfile(full):
        return "file not found"
    return None if has_image_extension(full) else "not an image extension"


def _verify(entries: list[_Entry], max_pixels: int) -> tuple[list[_Entry], list[Skipped]]:
    reasons = image_problems([e.path for e in entries], max_pixels)
    kept = [e for e, r in zip(entries, reasons, strict=True) if r is None]
    return kept, [Skipped(e.path, r) for e, r in zip(entries, reasons, strict=True) if r is not None]


def image_problems(paths: list[str], max_pixels: int = MAX_PIXELS) -> list[str | None]:
    """load_rgb's refusal reason for each path (None when it decodes), decoded in parallel threads (Pillow
    releases the GIL); the order is that of ``paths``."""
    with ThreadPoolExecutor() as pool:
        return list(pool.map(lambda path: _unusable_reason(path, max_pixels), paths))


def _unusable_reason(path: str, max_pixels: int) -> str | None:
    try:
        load_rgb(path, max_pixels)
    except UnreadableImage as exc:
        return str(exc)
    return None


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


def _check_classes(root: Path, entries: list[_Entry], declared: set[str], n_skipped: int, trainable: bool) -> None:
    """Fail early, naming the problem, when the data cannot train a classifier (not ``trainable``: has no images)."""
    if not entries:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(f"no images found in {root} (looked for {exts} files by class; {n_skipped} entries skipped)")
    if not trainable:
        return
    if len(declared) == 1:
        raise UserError(f"only one class found ('{next(iter(declared))}') in {root}; need at least 2 classes")
    per_class = Counter(e.label for e in entries)
    few = [f"'{c}' has {per_class[c]}" for c in sorted(declared) if per_class[c] < 2]
    if few:
        raise UserError(f"every class needs at least 2 usable images: {', '.join(few)}")
    # Unsplit images always leave at least one per class in train, so they count as train here.
    trainable = {e.label for e in entries if e.split in (None, "train")}
    missing = sorted({e.label for e in entries} - trainable)
    if missing:
        raise UserError(f"classes in val/test missing from train: {', '.join(missing)}")


def _assign_splits(entries: list[_Entry], val_f: float, test_f: float, seed: int) -> list[Sample]:
    """Give unsplit entries a seeded, per-class split; entries with an explicit split keep it."""
    samples = [Sample(e.path, e.label, e.split) for e in entries if e.split is not None]
    unsplit = sorted((e.label, e.path) for e in entries if e.split is None)  # sorted: listing order is irrelevant
    for label, group in groupby(unsplit, key=itemgetter(0)):
        samples += _split_class(label, [path for _, path in group], val_f, test_f, seed)
    return samples


def _split_class(label: str, paths: list[str], val_f: float, test_f: float, seed: int) -> list[Sample]:
    """Seeded shuffle of one class, cut per-class-rounded: ≥ 1 val/test where asked, ≥ 1 always left in train."""
    n = len(paths)
    n_val = max(1, math.floor(n * val_f + 0.5)) if val_f > 0 else 0
    n_test = max(0, min(max(1, math.floor(n * test_f + 0.5)) if test_f > 0 else 0, n - 1 - n_val))
    n_val = min(n_val, n - 1 - n_test)
    shuffled = list(paths)
    random.Random(f"{seed}/{label}").shuffle(shuffled)
    splits = ["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
    return [Sample(p, label, sp) for p, sp in zip(shuffled, splits, strict=True)]
