"""`transferkit pack`: a dataset (class folders, split folders or a CSV, with boxes or label sets) into WebDataset
tar shards (written by webdataset's `TarWriter`), and a shard folder read back as a `DatasetIndex` whose sample
paths are member references.

Layout of ``SHARDS/``:

- ``{split}-{n:05d}.tar``: each shard holds samples of one split (the split made at pack time is frozen). Members
  follow WebDataset conventions: ``{key}.{ext}`` (the original file's bytes, never re-encoded), ``{key}.cls`` (the
  class index as text; single-label only) and ``{key}.json`` (label or labels, split, original relative path, box).
  Keys are 8-digit sequence numbers, unique in the folder.
- ``index.json``: format tag and version, classes, multilabel flag, counts per split and class, skipped files with
  reasons, and per shard its name, split, size, sha256 and samples (key, member, byte offset of the image data in the
  tar, size, content sha256, label, box, original path). It is written last, atomically: a folder with it is complete.
- ``{split}.wids.json``: the split's shard list in the format of wids (webdataset's indexed reader).

Within a split the samples are in a seeded order (so a shard mixes classes and a bounded shuffle buffer suffices),
then cut into shards by size: a shard is filled until the next sample would exceed ``shard_size``. The plan is a pure
function of the dataset and the options, so a re-run computes the same one. Each shard is written atomically, and
recorded (with a digest of its plan) in ``.pack-state.jsonl`` when done; a re-run keeps every shard whose plan is
unchanged and whose file still has its recorded size and sha256, and writes the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import tarfile  # only to find the offsets of what webdataset wrote
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from transferkit import __version__
from transferkit.data import remote
from transferkit.data.boxes import Box
from transferkit.data.images import VALIDATION_SCALE, decode_rgb, scale_for
from transferkit.data.members import (
    FORMAT,
    INDEX_NAME,
    STATE_NAME,
    VERSION,
    check_shards,
    is_shard_folder,
    looks_packed,
    member_ref,
    read_index,
    shard_path,
)
from transferkit.data.sources import SPLITS, DatasetIndex, Sample, Skipped, scan_dataset
from transferkit.errors import UnreadableImage, UserError
from transferkit.fileio import atomic_path, atomic_write, output_folder
from transferkit.progress import Reporter

DEFAULT_SHARD_SIZE = 100_000_000
# A tar member takes a 512-byte header plus its data padded to 512 bytes: shards are planned before anything is
# written (so a re-run plans the same ones), from this estimate of their size.
_BLOCK = 512
_CHUNK = 64  # images read and verified at a time (bounded memory while packing)


@dataclass(frozen=True)
class _Item:
    """One planned sample: where its bytes come from and what goes into the shard beside them."""

    key: str
    source: str
    ext: str
    meta: dict  # the {key}.json member
    cls: int | None  # the {key}.cls member (single-label)
    box: Box | None
    stamp: tuple[int, int]  # source size and mtime_ns at planning time

    def tar_bytes(self) -> int:
        """The sample's planned size in its shard (see `_BLOCK`)."""
        cls = 2 * _BLOCK if self.cls is not None else 0
        return 2 * _BLOCK + _padded(self.stamp[0]) + cls + _padded(len(_json_bytes(self.meta)))


@dataclass
class _Shard:
    name: str
    split: str
    items: list[_Item] = field(default_factory=list)

    def plan_digest(self) -> str:
        """What the shard must hold: a finished shard is reused only if this is unchanged."""
        plan = [(i.key, i.source, i.ext, i.meta, i.cls, i.stamp) for i in self.items]
        return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:32]


def pack(data: str | os.PathLike[str], out: str | os.PathLike[str], shard_size_bytes: int = DEFAULT_SHARD_SIZE,
         val_split: float = 0.2, test_split: float = 0.0, seed: int = 0, reporter: Reporter | None = None) -> dict:
    """Pack `data` into WebDataset shards in `out`; returns the summary the CLI prints. Resumable (see above)."""
    reporter = reporter or Reporter()
    if shard_size_bytes <= 0:
        raise UserError(f"bad shard size {shard_size_bytes}: must be more than 0 bytes")
    out, source = Path(os.path.abspath(os.path.expanduser(out))), Path(os.path.abspath(os.path.expanduser(data)))
    if source.is_dir() and looks_packed(source):
        raise UserError(f"{source} is already a packed dataset")
    _check_not_inside(source, out)
    created = not out.exists()
    output_folder(out)
    try:
        index = scan_dataset(data, val_split, test_split, seed)
    except UserError:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # nothing was written: leave no empty folder behind
        raise
    shards = _plan(index, shard_size_bytes, seed)
    try:
        records, written = _write_all(out, shards, reporter)
        result = _index_json(index, shards, records, shard_size_bytes, (val_split, test_split))
        _write_wids_descriptors(out, result)
        atomic_write(out / INDEX_NAME, json.dumps(result, separators=(",", ":")))
    except OSError as exc:
        raise UserError(f"cannot write to {out}: {exc.strerror or exc}; finished shards are kept, run the same "
                        "command again to resume") from None
    (out / STATE_NAME).unlink(missing_ok=True)
    for item in result["skipped"]:
        reporter.warn(f"skipped {item['path']}: {item['reason']}")
    return _summary(out, result, written)


def _check_not_inside(data: Path, out: Path) -> None:
    if data.is_dir() and (out == data or data in out.parents):
        raise UserError(f"--out {out} is inside the dataset folder {data}: choose a folder outside it")


def _plan(index: DatasetIndex, shard_size: int, seed: int) -> list[_Shard]:
    """Shards per split, in a seeded sample order, each filled until the next sample would exceed `shard_size`."""
    base = index.root if os.path.isdir(index.root) else os.path.dirname(index.root)
    shards: list[_Shard] = []
    number = 0
    for split in SPLITS:
        samples = index.split(split)
        random.Random(f"{seed}/pack/{split}").shuffle(samples)
        used, count = 0, 0
        for sample in samples:
            item = _item(index, sample, f"{number:08d}", base)
            number += 1
            if count == 0 or (shards[-1].items and used + item.tar_bytes() > shard_size):
                shards.append(_Shard(f"{split}-{count:05d}.tar", split))
                used, count = 0, count + 1
            shards[-1].items.append(item)
            used += item.tar_bytes()
    return shards


def _item(index: DatasetIndex, sample: Sample, key: str, base: str) -> _Item:
    try:
        st = os.stat(sample.path)
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = (0, 0)  # gone since the scan: writing it reports why
    meta: dict = {"split": sample.split, "path": os.path.relpath(sample.path, base)}
    if index.multilabel:
        meta["labels"] = list(index.labels_of(sample))
    else:
        meta["label"] = sample.label
    if sample.box:
        meta["box"] = sample.box.to_list()
    ext = os.path.splitext(sample.path)[1].lower().lstrip(".")
    cls = None if index.multilabel else index.classes.index(sample.label)
    return _Item(key, sample.path, ext, meta, cls, sample.box, stamp)


def _write_all(out: Path, shards: list[_Shard], reporter: Reporter) -> tuple[dict[str, dict], list[str]]:
    """Reuse finished shards, write the others (recording each in the state file), remove stale ones."""
    previous = _previous_records(out)
    records = {s.name: previous[s.name] for s in shards if _reusable(out, s, previous.get(s.name))}
    todo = [s for s in shards if s.name not in records]
    stale = sorted(set(previous) - {s.name for s in shards})
    if todo or stale or not (out / INDEX_NAME).is_file():
        # From here on the folder is not a complete dataset: the state file says so, and holds what is kept.
        atomic_write(out / STATE_NAME, "".join(json.dumps(r) + "\n" for r in records.values()))
        (out / INDEX_NAME).unlink(missing_ok=True)
    for leftover in out.glob(".*.tar.*.tmp"):  # a killed run's temporary files
        leftover.unlink(missing_ok=True)
    with reporter.bar("packing", sum(len(s.items) for s in todo)) as advance, ThreadPoolExecutor() as pool:
        for shard in todo:
            records[shard.name] = _write_shard(out, shard, pool, advance)
            with open(out / STATE_NAME, "a") as state:
                state.write(json.dumps(records[shard.name]) + "\n")
                state.flush()
                os.fsync(state.fileno())
    for name in stale:
        (out / name).unlink(missing_ok=True)
    return records, [s.name for s in todo]


def _previous_records(out: Path) -> dict[str, dict]:
    """Shard records of an earlier run: its index, then its state file (a torn last line is ignored)."""
    records: dict[str, dict] = {}
    if (out / INDEX_NAME).is_file():
        with contextlib.suppress(UserError, KeyError, TypeError):  # unreadable: every shard is rewritten
            records.update({r["name"]: r for r in read_index(out)["shards"]})
    if (out / STATE_NAME).is_file():
        for line in (out / STATE_NAME).read_text().splitlines():
            try:
                record = json.loads(line)
                records[record["name"]] = record
            except (ValueError, KeyError, TypeError):
                continue
    return records


def _reusable(out: Path, shard: _Shard, record: dict | None) -> bool:
    """A finished shard with the same plan whose file still has its recorded size and sha256."""
    if not record or record.get("plan") != shard.plan_digest():
        return False
    path = out / shard.name
    try:
        return path.stat().st_size == record["size"] and _sha256(path) == record["sha256"]
    except OSError:
        return False


def _write_shard(out: Path, shard: _Shard, pool: ThreadPoolExecutor, advance: Callable[..., None]) -> dict:
    """Write one shard atomically with webdataset's TarWriter: every image is read once, decoded to prove it is
    usable, then stored as is; the index's byte offsets are read back from the finished file."""
    from webdataset import TarWriter  # noqa: PLC0415 - imports torch (~1 s): only `pack` needs it

    samples, skipped = [], []
    with atomic_path(out / shard.name) as tmp:
        with open(tmp, "wb") as raw:
            sink = _HashingFile(raw)
            # encoder=False: bytes are stored as given; a fixed mtime: the same input gives the same bytes; 0o644:
            # members extract as ordinary writable files, as before webdataset wrote them
            with TarWriter(sink, encoder=False, mtime=0, mode=0o644) as writer:
                for start in range(0, len(shard.items), _CHUNK):
                    chunk = shard.items[start:start + _CHUNK]
                    for item, (data, sha, problem) in zip(chunk, pool.map(_read_verified, chunk), strict=True):
                        if problem:
                            skipped.append({"path": item.source, "reason": problem})
                            continue
                        writer.write(_members(item, data))
                        samples.append(_record(item, len(data), sha))
                    advance(len(chunk))
        _add_offsets(tmp, samples)
    return {"name": shard.name, "split": shard.split, "size": sink.size, "sha256": sink.digest.hexdigest(),
            "plan": shard.plan_digest(), "samples": samples, "skipped": skipped}


def _members(item: _Item, data: bytes) -> dict:
    """One sample as webdataset writes it: `{key}.{ext}` (the image), `{key}.cls` (single-label), `{key}.json`."""
    sample = {"__key__": item.key, item.ext: data, "json": _json_bytes(item.meta)}
    if item.cls is not None:
        sample["cls"] = str(item.cls).encode()
    return sample


def _record(item: _Item, size: int, sha: str) -> dict:
    label = "|".join(item.meta["labels"]) if "labels" in item.meta else item.meta["label"]
    return {"key": item.key, "member": f"{item.key}.{item.ext}", "size": size, "sha256": sha, "label": label,
            "box": item.meta.get("box"), "path": item.meta["path"]}


def _add_offsets(tar_path: Path, samples: list[dict]) -> None:
    """Each image's byte offset in the finished shard, as the standard library's tar reader finds it (headers
    only: the data is skipped), for `members.read_member`'s single read; a member missing is a bug, not bad input."""
    with tarfile.open(tar_path) as tar:
        offsets = {member.name: member.offset_data for member in tar}
    for sample in samples:
        sample["offset"] = offsets[sample["member"]]


def _read_verified(item: _Item) -> tuple[bytes, str, str | None]:
    """(bytes, their sha256, None), or (b"", "", why the image cannot be used)."""
    try:
        with open(item.source, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return b"", "", f"cannot read: {exc.strerror or exc}"
    try:
        image = decode_rgb(data, reduce_to=scale_for(item.box, VALIDATION_SCALE))
    except UnreadableImage as exc:
        return b"", "", str(exc)
    problem = item.box.outside(*image.size) if item.box else None
    return (b"", "", problem) if problem else (data, hashlib.sha256(data).hexdigest(), None)


class _HashingFile:
    """A write-only file that hashes and counts what passes through: the shard's sha256 without reading it again."""

    def __init__(self, raw: io.BufferedWriter) -> None:
        self.raw, self.size, self.digest = raw, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def _index_json(index: DatasetIndex, shards: list[_Shard], records: dict[str, dict], shard_size: int,
                fractions: tuple[float, float]) -> dict:
    ordered = [records[s.name] for s in shards]
    tally = Counter((r["split"], label) for r in ordered for s in r["samples"]
                    for label in (s["label"].split("|") if index.multilabel else (s["label"],)))
    skipped = [{"path": s.path, "reason": s.reason} for s in index.skipped]
    skipped += [item for r in ordered for item in r.get("skipped", [])]
    return {
        "format": FORMAT, "version": VERSION, "transferkit_version": __version__,
        "source": index.root, "layout": index.layout, "seed": index.seed, "val_split": fractions[0],
        "test_split": fractions[1], "shard_size": shard_size, "classes": index.classes,
        "multilabel": index.multilabel,
        "counts": {sp: {c: tally[sp, c] for c in index.classes} for sp in SPLITS},
        "images": {sp: sum(len(r["samples"]) for r in ordered if r["split"] == sp) for sp in SPLITS},
        "bytes": sum(r["size"] for r in ordered),
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "shards": ordered,
    }


def _write_wids_descriptors(out: Path, index: dict) -> None:
    """`{split}.wids.json` per split: the shard list in wids' format, so `wids.ShardListDataset` gives indexed
    access to a split without transferkit (shard URLs are relative: the folder can be moved or served as is)."""
    for split in SPLITS:
        shards = [{"url": r["name"], "nsamples": len(r["samples"])} for r in index["shards"] if r["split"] == split]
        path = out / f"{split}.wids.json"
        if not shards:
            path.unlink(missing_ok=True)  # an earlier pack's split that this one does not have
            continue
        descriptor = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": f"{out.name}-{split}",
                      "shardlist": shards}
        atomic_write(path, json.dumps(descriptor, indent=1))


def _summary(out: Path, index: dict, written: list[str]) -> dict:
    names = [s["name"] for s in index["shards"]]
    return {"out": str(out), "shards": len(names), "images": index["images"], "bytes": index["bytes"],
            "classes": index["classes"], "skipped": index["skipped"], "written": written,
            "reused": [name for name in names if name not in written]}


def shard_dataset(folder: str | os.PathLike[str]) -> DatasetIndex:
    """A packed folder as a DatasetIndex (layout "shards", split as packed); missing or truncated shards and an
    unfinished pack are one-line UserErrors."""
    folder = folder if remote.is_url(folder) else Path(folder)
    if not is_shard_folder(folder) and remote.is_url(folder):
        raise UserError(f"no packed dataset at {folder}: no {INDEX_NAME} there (a URL is read only as `transferkit "
                        "pack` output)")
    if not is_shard_folder(folder):
        raise UserError(f"{folder} holds an unfinished pack (no {INDEX_NAME}): run `transferkit pack` again with "
                        "the same arguments to finish it")
    data = read_index(folder)
    try:
        check_shards(folder, data)
        samples = [Sample(member_ref(shard_path(folder, shard["name"]), s["member"]), s["label"], shard["split"],
                          Box(*s["box"]) if s.get("box") else None)
                   for shard in data["shards"] for s in shard["samples"]]
        skipped = [Skipped(s["path"], s["reason"]) for s in data["skipped"]]
        classes, seed, multilabel = list(data["classes"]), int(data["seed"]), bool(data["multilabel"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{shard_path(folder, INDEX_NAME)} is malformed ({type(exc).__name__}: {exc})") from None
    if not samples:
        raise UserError(f"no images in the packed dataset {folder}")
    samples.sort(key=lambda s: (SPLITS.index(s.split), s.label, s.path))
    return DatasetIndex(str(folder), classes, samples, skipped, "shards", seed, multilabel)


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _json_bytes(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True).encode()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
