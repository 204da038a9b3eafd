"""Packed datasets: pack -> read back (index, ShardStream, webdataset) preserves every image and label; resume; damaged
shards and unwritable outputs are one-line errors; training on shards shares the feature cache with loose files."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_class_folders, make_image
from transferkit.cli.main import run_cli
from transferkit.cli.pack import parse_size
from transferkit.data import shards
from transferkit.data.content import file_digest
from transferkit.data.images import load_image
from transferkit.data.loader import labelled_split
from transferkit.data.members import INDEX_NAME, is_shard_member, read_member, split_ref
from transferkit.data.sources import scan_dataset
from transferkit.data.stream import ShardStream, is_sharded, stream_loader
from transferkit.doctor.checks import pixel_size
from transferkit.errors import UserError

SMALL_SHARD = 20_000  # about three 40 px PNGs per shard: several shards per split


def _pixels(image: Image.Image) -> str:
    """What a transform returns in these tests: a digest of the decoded (cropped) pixels."""
    return hashlib.sha256(image.tobytes()).hexdigest()


def _folders(root: Path) -> Path:
    """Three classes of PNGs plus a JPEG and an upper-case .JPG, and two files that must be skipped."""
    make_class_folders(root, classes=3, per_class=8)
    rng = np.random.default_rng(7)
    make_image(0, rng).save(root / "class_0" / "photo.jpg", quality=90)
    make_image(1, rng).save(root / "class_1" / "CAPS.JPG", quality=90)
    (root / "class_2" / "garbage.png").write_bytes(b"not an image at all")
    whole = (root / "class_2" / "img_000.png").read_bytes()
    (root / "class_2" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return root


def _packed(tmp_path: Path, data: Path, **options) -> tuple[Path, dict]:
    out = tmp_path / "shards"
    summary = shards.pack(data, out, options.pop("shard_size_bytes", SMALL_SHARD), **options)
    return out, summary


def _by_content(index) -> Counter:
    """(content digest, label, split, box) of every sample: equal for a loose dataset and its packed copy."""
    return Counter((file_digest(s.path), s.label, s.split, s.box) for s in index.samples)


def test_pack_round_trip_class_folders(tmp_path: Path) -> None:
    data = _folders(tmp_path / "data")
    out, summary = _packed(tmp_path, data, seed=3)
    loose, packed = scan_dataset(data, seed=3), scan_dataset(out)
    assert packed.layout == "shards" and packed.classes == loose.classes and packed.seed == 3
    assert _by_content(packed) == _by_content(loose)  # same images, labels and split as `train DATA` would use
    assert packed.counts() == loose.counts()
    sources = {file_digest(s.path): s.path for s in loose.samples}
    for sample in packed.samples:
        assert is_shard_member(sample.path) and not is_shard_member(sources[file_digest(sample.path)])
        original = sources[file_digest(sample.path)]
        assert read_member(sample.path) == Path(original).read_bytes()  # stored as is, not re-encoded
        assert _pixels(load_image(sample.path)) == _pixels(load_image(original))
        assert pixel_size(sample.path) == pixel_size(original)  # doctor reads members too
    assert {Path(s.path).name: s.reason for s in packed.skipped} == {
        "garbage.png": "not an image", "truncated.png": "truncated or corrupt"}
    index = json.loads((out / INDEX_NAME).read_text())
    assert summary["shards"] == len(index["shards"]) > 6 and summary["written"] == [s["name"] for s in index["shards"]]
    for shard in index["shards"]:  # one split per shard, named after it, with its samples' split
        assert re.fullmatch(rf"{shard['split']}-\d{{5}}\.tar", shard["name"])
        assert {s.split for s in packed.samples if split_ref(s.path)[0].endswith(shard["name"])} == {shard["split"]}
        assert (out / shard["name"]).stat().st_size == shard["size"]
    assert {s["member"].rsplit(".", 1)[1] for sh in index["shards"] for s in sh["samples"]} == {"png", "jpg"}


def _box_csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    rows = []
    for c in range(2):
        for i in range(5):
            path = tmp_path / "img" / f"c{c}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            make_image(c, rng).save(path)
            rows.append([f"img/{path.name}", f"label{c}", "", 2, 3, 30 + i, 35])
    rows.append(["img/c0_0.png", "label1", "", 0, 0, 10, 10])  # the same file with a second box
    rows.append(["img/c1_0.png", "label1", "", 0, 0, 99, 99])  # a box outside its image: skipped
    table = tmp_path / "boxes.csv"
    with open(table, "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "split", "x1", "y1", "x2", "y2"], *rows])
    return table


def test_pack_round_trip_csv_with_boxes(tmp_path: Path) -> None:
    table = _box_csv(tmp_path)
    out, _ = _packed(tmp_path, table, seed=1)
    loose, packed = scan_dataset(table, seed=1), scan_dataset(out)
    assert _by_content(packed) == _by_content(loose) and sum(s.box is not None for s in packed.samples) == 11
    assert [s.reason for s in packed.skipped] == [s.reason for s in loose.skipped]
    assert "outside" in packed.skipped[0].reason
    for split in ("train", "val"):
        a, b = labelled_split(loose, split, 0.1), labelled_split(packed, split, 0.1)
        pixels = lambda lab: Counter(  # noqa: E731
            (_pixels(load_image(p, r)), int(t)) for p, r, t in zip(lab.paths, lab.crops, lab.targets, strict=True))
        assert pixels(a) == pixels(b)  # the same crops with the same margin, the same targets


def test_pack_round_trip_multilabel(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rows = []
    for i, labels in enumerate(["a|b", "a", "b", "a|c", "c", "b|c"] * 3):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image(i % 3, rng).save(path)
        rows.append([str(path), labels])
    table = tmp_path / "multi.csv"
    with open(table, "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label"], *rows])
    out, _ = _packed(tmp_path, table)
    loose, packed = scan_dataset(table), scan_dataset(out)
    assert packed.multilabel and packed.classes == ["a", "b", "c"] and _by_content(packed) == _by_content(loose)
    index = json.loads((out / INDEX_NAME).read_text())
    assert all(not s["member"].endswith(".cls") for sh in index["shards"] for s in sh["samples"])
    stream = ShardStream(packed, _pixels, "train", seed=0)
    expected = labelled_split(loose, "train", 0.0)
    want = Counter((_pixels(load_image(p)), tuple(t.tolist())) for p, t in zip(expected.paths, expected.targets,
                                                                             strict=True))
    assert Counter((pixels, tuple(t.tolist())) for pixels, t in stream) == want  # multi-hot rows as labelled_split


def test_webdataset_reads_our_shards(tmp_path: Path) -> None:
    import webdataset

    data = _folders(tmp_path / "data")
    out, _ = _packed(tmp_path, data)
    index = json.loads((out / INDEX_NAME).read_text())
    urls = [str(out / shard["name"]) for shard in index["shards"]]
    read = {s["__key__"]: s for s in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False)}
    recorded = {s["key"]: s for shard in index["shards"] for s in shard["samples"]}
    assert set(read) == set(recorded)
    classes = index["classes"]
    for key, sample in read.items():
        ext = recorded[key]["member"].rsplit(".", 1)[1]
        original = Path(index["source"]) / json.loads(sample["json"])["path"]
        assert sample[ext] == original.read_bytes()
        assert int(sample["cls"]) == classes.index(recorded[key]["label"]) == classes.index(original.parent.name)


def test_wids_gives_indexed_access_to_each_split(tmp_path: Path) -> None:
    import wids

    data = _folders(tmp_path / "data")
    out, summary = _packed(tmp_path, data)
    index = json.loads((out / INDEX_NAME).read_text())
    for split in ("train", "val"):
        recorded = [s for shard in index["shards"] if shard["split"] == split for s in shard["samples"]]
        dataset = wids.ShardListDataset(str(out / f"{split}.wids.json"), transformations=[],
                                        cache_dir=str(tmp_path / "wids-cache"))
        assert len(dataset) == summary["images"][split] == len(recorded) > 0
        for i in (0, len(dataset) - 1):
            sample = dataset[i]
            ext = "." + recorded[i]["member"].rsplit(".", 1)[1]
            assert sample["__key__"] == recorded[i]["key"]
            assert sample[ext].read() == (Path(index["source"]) / recorded[i]["path"]).read_bytes()
    assert not (out / "test.wids.json").exists()  # no test split, no descriptor


def _stream_dataset(tmp_path: Path) -> tuple[Path, Counter]:
    """A packed dataset (24 images, 18 of them in train, about 6 train shards) and its train split's
    (pixels, target) multiset."""
    data = make_class_folders(tmp_path / "data", classes=3, per_class=8)
    out, _ = _packed(tmp_path, data)
    train = labelled_split(scan_dataset(data), "train", 0.0)
    expected = Counter((_pixels(load_image(p)), int(t)) for p, t in zip(train.paths, train.targets, strict=True))
    return out, expected


def test_stream_epoch_yields_each_sample_once_in_a_seeded_order(tmp_path: Path) -> None:
    out, expected = _stream_dataset(tmp_path)
    stream = ShardStream(out, _pixels, "train", shuffle_buffer=8, seed=5)
    epoch0 = [(pixels, int(t)) for pixels, t in stream]
    assert Counter(epoch0) == expected and len(epoch0) == len(stream) == 18
    stream.set_epoch(1)
    epoch1 = [(pixels, int(t)) for pixels, t in stream]
    assert Counter(epoch1) == expected and epoch1 != epoch0  # reshuffled every epoch
    again = ShardStream(out, _pixels, "train", shuffle_buffer=8, seed=5)
    again.set_epoch(1)
    assert [(pixels, int(t)) for pixels, t in again] == epoch1  # a pure function of (seed, epoch)
    in_order = ShardStream(out, _pixels, "train", shuffle=False)
    assert [p for p, _ in in_order] == [p for p, _ in in_order]
    assert Counter((p, int(t)) for p, t in in_order) == expected


def test_stream_partitions_across_ranks_and_workers(tmp_path: Path) -> None:
    out, expected = _stream_dataset(tmp_path)
    for buffer_shards in (True, False):  # ~6 shards for 4 units: by shard; 1 shard: samples by index modulo
        if not buffer_shards:
            out = tmp_path / "one"
            shards.pack(tmp_path / "data", out, 10**9)
        stream = ShardStream(out, _pixels, "train", seed=2, balance=False)
        units = [stream.unit_order(rank, 2, worker, 2) for rank in range(2) for worker in range(2)]
        assert sorted(p for u in units for p in u) == list(range(18)) and all(units)  # no overlap, no loss, none idle
        yielded = [(pixels, int(t)) for rank in range(2) for worker in range(2)
                   for pixels, t in stream.iterate(rank, 2, worker, 2)]
        assert Counter(yielded) == expected
        balanced = ShardStream(out, _pixels, "train", seed=2, rank=1, world=2)  # padded: same count everywhere
        counts = {len(balanced.unit_order(rank, 2, worker, 2)) for rank in range(2) for worker in range(2)}
        assert len(counts) == 1 and set().union(*(balanced.unit_order(r, 2, w, 2) for r in (0, 1) for w in (0, 1))) \
            == set(range(18))
    loader = stream_loader(out, "train", _pixels, batch_size=4, workers=2, seed=1)  # real worker processes
    assert Counter((p, int(t)) for pixels, targets in loader for p, t in zip(pixels, targets, strict=True)) == expected
    assert is_sharded(labelled_split(scan_dataset(out), "val", 0.0))


def test_pack_resume_rewrites_only_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_class_folders(tmp_path / "data", classes=2, per_class=8)
    out, first = _packed(tmp_path, data)
    names = first["written"]
    inodes = {name: (out / name).stat().st_ino for name in names}
    (out / names[1]).unlink()
    with open(out / names[2], "r+b") as handle:
        handle.truncate(700)
    again = shards.pack(data, out, SMALL_SHARD)
    assert again["written"] == [names[1], names[2]] and len(again["reused"]) == len(names) - 2
    assert all((out / n).stat().st_ino == inodes[n] for n in again["reused"])  # untouched files
    assert _by_content(scan_dataset(out)) == _by_content(scan_dataset(data))

    # A run killed after two shards: no index (the folder is not a dataset yet), then a re-run finishes it.
    crashed = tmp_path / "crashed"
    real_write, done = shards._write_shard, []

    def write_two(*args, **kwargs):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(args[1].name)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(shards, "_write_shard", write_two)
    with pytest.raises(KeyboardInterrupt):
        shards.pack(data, crashed, SMALL_SHARD)
    monkeypatch.setattr(shards, "_write_shard", real_write)
    assert not (crashed / INDEX_NAME).exists() and not list(crashed.glob(".*.tmp"))
    with pytest.raises(UserError, match="unfinished pack"):
        scan_dataset(crashed)
    finished = shards.pack(data, crashed, SMALL_SHARD)
    assert finished["reused"] == done and finished["written"] == names[2:]
    assert _by_content(scan_dataset(crashed)) == _by_content(scan_dataset(data))


def test_pack_killed_inside_a_shard_leaves_no_partial_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import webdataset

    data = make_class_folders(tmp_path / "data", classes=2, per_class=8)
    out, real_write, writers, calls = tmp_path / "shards", webdataset.TarWriter.write, [], []

    def killed_in_second_shard(self, sample):  # after the second shard's first sample is written
        if not writers or writers[-1] is not self:
            writers.append(self)
        if len(writers) == 2 and calls[-1] is self:
            raise KeyboardInterrupt
        calls.append(self)
        return real_write(self, sample)

    monkeypatch.setattr(webdataset.TarWriter, "write", killed_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        shards.pack(data, out, SMALL_SHARD)
    monkeypatch.undo()
    state = [json.loads(line) for line in (out / shards.STATE_NAME).read_text().splitlines()]
    assert len(state) == 1  # the first shard finished; the second, half written, left nothing
    assert sorted(p.name for p in out.iterdir()) == sorted([shards.STATE_NAME, *(s["name"] for s in state)])
    for record in state:  # what is there is whole: webdataset reads every recorded sample from it
        read = webdataset.WebDataset(str(out / record["name"]), shardshuffle=False, empty_check=False)
        assert [s["__key__"] for s in read] == [s["key"] for s in record["samples"]]
    again = shards.pack(data, out, SMALL_SHARD)
    assert again["reused"] == [s["name"] for s in state] and again["written"]
    assert _by_content(scan_dataset(out)) == _by_content(scan_dataset(data))


def test_stream_reads_each_unit_in_its_order_padding_included(tmp_path: Path) -> None:
    out, _ = _stream_dataset(tmp_path)
    shards.pack(tmp_path / "data", tmp_path / "one", 10**9)
    for folder in (out, tmp_path / "one"):  # units of whole shards; units taking every 4th sample of one shard
        train = labelled_split(scan_dataset(folder), "train", 0.0)
        pixels = [_pixels(load_image(path)) for path in train.paths]
        stream = ShardStream(train, _pixels, shuffle=False, rank=0, world=2)  # balanced: padded with repeats
        orders = {(r, w): stream.unit_order(r, 2, w, 2) for r in range(2) for w in range(2)}
        assert any(len(order) > len(set(order)) for order in orders.values())  # some unit rereads its first images
        for (rank, worker), order in orders.items():
            assert [p for p, _ in stream.iterate(rank, 2, worker, 2)] == [pixels[i] for i in order]


def test_stream_reports_a_shard_cut_off_after_it_was_opened(tmp_path: Path) -> None:
    out, _ = _stream_dataset(tmp_path)
    stream = ShardStream(out, _pixels, "train", shuffle=False)
    index = json.loads((out / INDEX_NAME).read_text())
    shard = next(s for s in index["shards"] if s["split"] == "train" and len(s["samples"]) > 1)
    second = min(s["offset"] for s in shard["samples"][1:])
    for cut in (second + 100, second - 512):  # inside the image's data; just before its header
        with open(out / shard["name"], "r+b") as handle:
            handle.truncate(cut)
        with pytest.raises(UserError, match=f"{shard['name']} is truncated"):
            list(stream)


def _one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("transferkit: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_or_truncated_shard_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       tiny_weights: str) -> None:
    data = make_class_folders(tmp_path / "data", classes=2, per_class=6)
    out, summary = _packed(tmp_path, data)
    argv = ["train", str(out), "--out", str(tmp_path / "run"), "--backbone", "test_efficientnet", "--weights",
            tiny_weights, "--quiet"]
    victim = out / summary["written"][1]
    victim.rename(tmp_path / "aside.tar")
    err = _one_error_line(capsys, argv)
    assert victim.name in err and "missing" in err
    (tmp_path / "aside.tar").rename(victim)
    with open(victim, "r+b") as handle:
        handle.truncate(1000)
    assert "truncated" in _one_error_line(capsys, argv)
    assert not (tmp_path / "run" / "meta.json").exists()  # no run left behind as if complete


def test_pack_cli_output_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_class_folders(tmp_path / "data", classes=2, per_class=4)
    (tmp_path / "file").write_text("x")
    assert "is a file" in _one_error_line(capsys, ["pack", str(data), "--out", str(tmp_path / "file")])
    for size in ("0", "0MB", "12XB", "-5MB", "MB"):
        assert "shard-size" in _one_error_line(capsys, ["pack", str(data), "--out", str(tmp_path / "s"), "--shard-size",
                                                        size])
    assert "inside the dataset" in _one_error_line(capsys, ["pack", str(data), "--out", str(data / "shards")])
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "cannot write" in _one_error_line(capsys, ["pack", str(data), "--out", str(locked)])

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards, "_write_shard", disk_full)
    full = tmp_path / "full"
    assert "No space left on device" in _one_error_line(capsys, ["pack", str(data), "--out", str(full)])
    assert not (full / INDEX_NAME).exists()


def test_pack_cli_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_class_folders(tmp_path / "data", classes=2, per_class=5)
    assert run_cli(["pack", str(data), "--out", str(tmp_path / "s"), "--shard-size", "8KB", "--test-split", "0.2",
                    "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == {"train": 6, "val": 2, "test": 2} and summary["shards"] == len(summary["written"])
    assert run_cli(["pack", str(data), "--out", str(tmp_path / "s"), "--shard-size", "8KB", "--test-split", "0.2"]) == 0
    assert "kept from an earlier run; 0 files skipped" in capsys.readouterr().err
    assert "already a packed dataset" in _one_error_line(capsys, ["pack", str(tmp_path / "s"), "--out",
                                                                  str(tmp_path / "again")])
    (tmp_path / "empty").mkdir()
    assert "no images found" in _one_error_line(capsys, ["pack", str(tmp_path / "empty"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()  # a failed scan leaves no empty output folder behind
    assert parse_size("100MB") == 10**8 and parse_size("512KB") == 512_000 and parse_size("1GB") == 10**9
    assert parse_size("64MiB") == 64 << 20 and parse_size("4096") == 4096


def test_train_on_shards_shares_the_feature_cache(tmp_path: Path, fast: dict, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from transferkit import api
    from transferkit.features import extract as features

    data = make_class_folders(tmp_path / "data", classes=2, per_class=8)
    out, _ = _packed(tmp_path, data)
    through_backbone: list[int] = []
    real_compute = features.FeatureExtractor._compute

    def counting(self, paths, crops, seeds, transform, label, sink):
        if label.startswith("features"):  # the frozen backbone's (cached) features, not the report's embeddings
            through_backbone.append(len(paths))
        return real_compute(self, paths, crops, seeds, transform, label, sink)

    monkeypatch.setattr(features.FeatureExtractor, "_compute", counting)
    cache = str(tmp_path / "cache")
    run = api.train(out, tmp_path / "run", cache_dir=cache, **fast)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["layout"] == "shards" and all(is_shard_member(p) for p in split["train"])
    assert sum(through_backbone) >= 16 and 0 <= run.metrics["accuracy"] <= 1
    through_backbone.clear()
    api.train(data, tmp_path / "loose", cache_dir=cache, **fast)  # same images as loose files: all cached
    assert sum(through_backbone) == 0
    assert run_cli(["predict", str(tmp_path / "run"), str(out), "--json"]) == 0  # predict reads a packed folder
    assert len(json.loads(capsys.readouterr().out)) == 16
    assert torch.equal(labelled_split(scan_dataset(out), "train", 0).targets,
                       labelled_split(scan_dataset(data), "train", 0).targets)


def test_stream_augmentation_is_seeded_per_image(tmp_path: Path) -> None:
    out, _ = _stream_dataset(tmp_path)

    def draw(image: Image.Image) -> tuple[str, float]:  # a random transform: what augmentation draws
        return _pixels(image), torch.rand(1).item()

    stream = ShardStream(out, draw, "train", seed=4, balance=False)
    state = torch.random.get_rng_state()
    single = dict(view for view, _ in stream)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left as it was
    split = dict(view for rank in range(2) for worker in range(2) for view, _ in stream.iterate(rank, 2, worker, 2))
    assert split == single and len(set(single.values())) == len(single)  # the same draw whoever reads the image
    stream.set_epoch(1)
    assert all(dict(view for view, _ in stream)[k] != v for k, v in single.items())  # new draws each epoch
