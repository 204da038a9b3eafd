"""scan_dataset: three layouts, seeded stratified splits, bad files skipped with reasons, one-line UserErrors."""

from __future__ import annotations

import csv
import json
import os
import threading
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit.data import sources
from transferkit.data.sources import Skipped, scan_dataset
from transferkit.errors import UserError


def _image(path: Path, size: int = 32) -> Path:
    """A small PNG whose content depends on its name, so no two files are the same."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _classes(root: Path, counts: dict[str, int]) -> Path:
    for label, n in counts.items():
        for i in range(n):
            _image(root / label / f"{label}_{i:02d}.png")
    return root


def _write_csv(path: Path, rows: Iterable[Iterable[str]], header: str = "path,label,split") -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header.split(","))
        writer.writerows(rows)
    return path


def _user_error(*args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        scan_dataset(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_class_folders_are_split_per_class(tmp_path: Path) -> None:
    root = _classes(tmp_path / "data", {"dog": 9, "cat": 5, "ant": 2})
    _image(root / "dog" / "batch1" / "deep" / "x.png")  # nested folders belong to their class folder
    index = scan_dataset(root, val_split=0.2)
    assert index.layout == "classes" and index.classes == ["ant", "cat", "dog"]
    assert index.counts() == {
        "train": {"ant": 1, "cat": 4, "dog": 8},
        "val": {"ant": 1, "cat": 1, "dog": 2},
        "test": {"ant": 0, "cat": 0, "dog": 0},
    }
    assert all(os.path.isabs(s.path) and s.path.startswith(index.root + os.sep) for s in index.samples)
    assert all(Path(s.path).relative_to(root).parts[0] == s.label for s in index.samples)
    assert index.skipped == []
    assert {s.split for s in index.split("val")} == {"val"}
    with pytest.raises(ValueError):
        index.split("holdout")


def test_test_split_is_carved_per_class_and_train_keeps_one(tmp_path: Path) -> None:
    index = scan_dataset(_classes(tmp_path, {"a": 3, "b": 20}), val_split=0.25, test_split=0.25)
    assert index.counts() == {"train": {"a": 1, "b": 10}, "val": {"a": 1, "b": 5}, "test": {"a": 1, "b": 5}}
    tiny = scan_dataset(_classes(tmp_path / "tiny", {"a": 2, "b": 2}), val_split=0.1, test_split=0.1)
    assert tiny.counts()["train"] == {"a": 1, "b": 1} and tiny.counts()["val"] == {"a": 1, "b": 1}


def test_split_is_seeded_and_reproducible(tmp_path: Path) -> None:
    root = _classes(tmp_path, {"a": 20, "b": 20})
    first, again, other = (scan_dataset(root, seed=s) for s in (7, 7, 8))
    assert first.samples == again.samples and first.split_json() == again.split_json()
    assert {s.path for s in first.split("val")} != {s.path for s in other.split("val")}
    assert first.counts() == other.counts()


def test_split_does_not_depend_on_listing_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _classes(tmp_path, {"a": 9, "b": 7})
    expected = scan_dataset(root, seed=3)
    real_walk = os.walk

    def reversed_walk(*args, **kwargs):
        for dirpath, dirnames, filenames in real_walk(*args, **kwargs):
            dirnames.reverse()
            filenames.reverse()
            yield dirpath, dirnames, filenames

    monkeypatch.setattr(os, "walk", reversed_walk)
    assert scan_dataset(root, seed=3).samples == expected.samples


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_split_folders_are_kept_as_given(tmp_path: Path, val_name: str) -> None:
    _classes(tmp_path / "train", {"cat": 4, "dog": 3})
    _classes(tmp_path / val_name, {"cat": 2, "dog": 1})
    _classes(tmp_path / "test", {"cat": 1, "dog": 1})
    index = scan_dataset(tmp_path)
    assert index.layout == "splits"
    assert index.counts() == {"train": {"cat": 4, "dog": 3}, "val": {"cat": 2, "dog": 1}, "test": {"cat": 1, "dog": 1}}
    assert {Path(s.path).parts[-3] for s in index.split("val")} == {val_name}


def test_train_folder_without_val_is_split_and_test_is_kept(tmp_path: Path) -> None:
    _classes(tmp_path / "train", {"cat": 10, "dog": 5})
    _classes(tmp_path / "test", {"cat": 2, "dog": 2})
    index = scan_dataset(tmp_path, val_split=0.2, test_split=0.3)
    assert index.counts() == {"train": {"cat": 8, "dog": 4}, "val": {"cat": 2, "dog": 1}, "test": {"cat": 2, "dog": 2}}
    assert all("/test/" in s.path for s in index.split("test"))
    assert all("/train/" in s.path for s in index.split("val"))


def test_csv_with_splits_relative_and_absolute_paths(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    a = [_image(imgs / f"a{i}.png") for i in range(4)]
    b = [_image(imgs / f"b{i}.png") for i in range(4)]
    rows = [("imgs/a0.png", "a", "train"), ("imgs/a1.png", "a", "Valid"), (str(a[2]), "a", "validation")]
    rows += [("imgs/a3.png", "a", "test"), ("imgs/b0.png", "b", "TRAIN"), ("imgs/b1.png", "b", "val")]
    rows += [("imgs/b2.png", "b", ""), ("imgs/b3.png", "b", ""), ("imgs/gone.png", "b", "train")]
    index = scan_dataset(_write_csv(tmp_path / "labels.csv", rows))
    assert index.layout == "csv" and index.root == str(tmp_path / "labels.csv")
    assert index.counts() == {"train": {"a": 1, "b": 2}, "val": {"a": 2, "b": 2}, "test": {"a": 1, "b": 0}}
    assert {s.path for s in index.samples} == {str(p) for p in a + b}
    assert index.skipped == [Skipped(str(imgs / "gone.png"), "file not found")]


@pytest.mark.parametrize(("header", "delimiter"), [("path,label", ","), ("Filename;Class", ";"),
                                                  ("image\tcategory", "\t"), ("\ufeffPath,Label,file", ",")])
def test_csv_as_spreadsheets_save_it(tmp_path: Path, header: str, delimiter: str) -> None:
    """Excel in comma-decimal locales writes `;`, Keras names its columns filename and class; a BOM, upper case or
    a second path-like column change nothing (the first known name of each column is used)."""
    rows = [f"{_image(tmp_path / f'{name}.png').name}{delimiter}{name[0]}" for name in ("a0", "a1", "b0", "b1")]
    if header.endswith(",file"):
        rows = [f"{row},ignored.png" for row in rows]
    (tmp_path / "labels.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    index = scan_dataset(tmp_path / "labels.csv")
    assert index.classes == ["a", "b"] and len(index.samples) == 4 and not index.skipped


def test_csv_written_on_windows_finds_its_files(tmp_path: Path) -> None:
    """`imgs\\a0.png`, as a CSV saved on Windows holds it, names imgs/a0.png here."""
    rows = [(f"imgs\\{_image(tmp_path / 'imgs' / f'{name}.png').name}", name[0]) for name in ("a0", "a1", "b0", "b1")]
    index = scan_dataset(_write_csv(tmp_path / "labels.csv", rows))
    assert sorted(s.path for s in index.samples) == sorted(str(p) for p in (tmp_path / "imgs").iterdir())
    assert not index.skipped


def test_csv_with_train_and_test_rows_carves_val_from_train_like_folders(tmp_path: Path) -> None:
    rows = [(str(_image(tmp_path / f"{c}{i}.png")), c, "test" if i < 2 else "train") for c in "ab" for i in range(12)]
    index = scan_dataset(_write_csv(tmp_path / "labels.csv", rows), val_split=0.2, test_split=0.3)
    assert index.counts() == {"train": {"a": 8, "b": 8}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}}
    named_test = {path for path, _, split in rows if split == "test"}
    assert {s.path for s in index.split("test")} == named_test


def test_csv_without_split_column_matches_the_folder_split(tmp_path: Path) -> None:
    root = _classes(tmp_path / "data", {"a": 6, "b": 5})
    folder = scan_dataset(root, seed=5)
    rows = [(os.path.relpath(s.path, tmp_path), s.label) for s in reversed(folder.samples)]
    from_csv = scan_dataset(_write_csv(tmp_path / "list.csv", rows, header="Path,Label"), seed=5)
    assert from_csv.samples == folder.samples  # same paths + seed => same split, whatever the source


def test_split_json_round_trips(tmp_path: Path) -> None:
    index = scan_dataset(_classes(tmp_path / "data", {"a": 5, "b": 5}), val_split=0.2, test_split=0.2, seed=11)
    data = json.loads(json.dumps(index.split_json()))
    assert data["seed"] == 11 and data["layout"] == "classes"
    assert {k: len(v) for k, v in data.items() if k in ("train", "val", "test")} == {"train": 6, "val": 2, "test": 2}
    label = {s.path: s.label for s in index.samples}
    rows = [(p, label[p], split) for split in ("train", "val", "test") for p in data[split]]
    again = scan_dataset(_write_csv(tmp_path / "split.csv", rows), seed=99)
    assert again.samples == index.samples


def test_planted_bad_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    root = _classes(tmp_path / "data", {"cat": 3, "dog": 3})
    good = _image(root / "cat" / "full.jpg")
    (root / "cat" / "truncated.png").write_bytes(_image(tmp_path / "x.png").read_bytes()[:500])
    (root / "cat" / "empty.jpg").touch()
    (root / "dog" / "text.jpg").write_text("hello")
    (root / "dog" / "notes.txt").write_text("hello")
    (root / "dog" / ".DS_Store").write_bytes(b"\0\0")
    (root / ".DS_Store").write_bytes(b"\0\0")
    (root / "README.md").write_text("hi")
    _image(root / "dog" / ".thumbs" / "t.png")
    _image(root / ".cache" / "c.png")
    _image(root / "__MACOSX" / "cat" / "._good.png")  # what unzipping a Mac-made archive leaves: not a class
    index = scan_dataset(root)
    assert {(os.path.relpath(s.path, root), s.reason) for s in index.skipped} == {
        ("cat/truncated.png", "truncated or corrupt"),
        ("cat/empty.jpg", "empty file"),
        ("dog/text.jpg", "not an image"),
        ("dog/notes.txt", "not an image extension"),
        ("dog/.DS_Store", "hidden file"),
        ("dog/.thumbs", "hidden folder"),
        (".DS_Store", "hidden file"),
        (".cache", "hidden folder"),
        ("__MACOSX", "system folder"),
        ("README.md", "not in a class folder"),
    }
    assert index.classes == ["cat", "dog"] and str(good) in {s.path for s in index.samples}
    assert len(index.samples) == 7
    assert [s.path for s in index.skipped] == sorted(s.path for s in index.skipped)


def test_without_verify_files_are_not_decoded(tmp_path: Path) -> None:
    root = _classes(tmp_path, {"cat": 2, "dog": 2})
    (root / "cat" / "broken.png").write_bytes(b"garbage")
    (root / "cat" / "notes.txt").write_text("x")
    index = scan_dataset(root, verify=False)
    assert str(root / "cat" / "broken.png") in {s.path for s in index.samples}
    assert [s.reason for s in index.skipped] == ["not an image extension"]


def test_stray_entries_next_to_split_folders_are_skipped(tmp_path: Path) -> None:
    _classes(tmp_path / "train", {"a": 2, "b": 2})
    _classes(tmp_path / "val", {"a": 1, "b": 1})
    (tmp_path / "notes.txt").write_text("x")
    _image(tmp_path / "train" / "loose.png")
    _image(tmp_path / "extra" / "a" / "e.png")
    reasons = {os.path.relpath(s.path, tmp_path): s.reason for s in scan_dataset(tmp_path).skipped}
    assert reasons == {
        "notes.txt": "not in a train/val/test folder",
        "extra": "not in a train/val/test folder",
        "train/loose.png": "not in a class folder",
    }


def test_pixel_limit_reaches_verification(tmp_path: Path) -> None:
    root = _classes(tmp_path, {"a": 2, "b": 2})
    _image(root / "a" / "big.png", size=64)
    index = scan_dataset(root, max_pixels=40 * 40)
    assert index.skipped == [Skipped(str(root / "a" / "big.png"), "too large: 64×64 pixels exceeds limit 1600")]


def test_symlink_loop_does_not_hang(tmp_path: Path) -> None:
    root = _classes(tmp_path, {"a": 2, "b": 2})
    (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)
    index = scan_dataset(root)
    assert len(index.samples) == 4
    assert [s.reason for s in index.skipped] == ["same folder as one already scanned (symlink)"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"val_split": 0}, "bad val_split 0"),
        ({"val_split": 1}, "bad val_split 1"),
        ({"val_split": -0.1}, "bad val_split"),
        ({"val_split": float("nan")}, "bad val_split"),
        ({"test_split": -0.2}, "bad test_split"),
        ({"val_split": 0.5, "test_split": 0.5}, "val_split + test_split is 1"),
    ],
)
def test_bad_fractions(tmp_path: Path, kwargs: dict, expected: str) -> None:
    assert expected in _user_error(_classes(tmp_path, {"a": 2, "b": 2}), **kwargs)


def test_wrong_path_or_single_class(tmp_path: Path) -> None:
    assert _user_error(tmp_path / "nope") == f"path does not exist: {tmp_path / 'nope'}"
    assert "expected a folder of images or a .csv file" in _user_error(_image(tmp_path / "x.png"))
    assert "only one class found ('cat')" in _user_error(_classes(tmp_path / "data", {"cat": 5}))


def test_no_images(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("x")
    message = _user_error(tmp_path)
    assert message.startswith(f"no images found in {tmp_path}") and ".png" in message
    assert "class subfolders" in message and "1 other entries passed over" in message


def test_a_flat_folder_of_images_is_told_the_layout(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / "group_A" / f"photo_{i}.png")
    message = _user_error(tmp_path / "group_A")
    assert message.startswith(f"no images in class subfolders of {tmp_path / 'group_A'}: 3 images lie directly in it")
    assert str(tmp_path / "group_A" / "CLASS" / "image.jpg") in message and "skipped" not in message


def test_class_with_too_few_usable_images(tmp_path: Path) -> None:
    root = _classes(tmp_path, {"cat": 5, "dog": 1, "emu": 0})
    (root / "emu").mkdir()
    (root / "emu" / "bad.png").write_text("not a png")
    assert _user_error(root).endswith("at least 2 usable images: 'dog' has 1, 'emu' has 0")


def test_split_folder_errors(tmp_path: Path) -> None:
    _classes(tmp_path / "train", {"cat": 3, "dog": 3})
    _classes(tmp_path / "val", {"cat": 1, "dog": 1, "bird": 2})
    assert _user_error(tmp_path).endswith("classes in val/test missing from train: bird")
    _classes(tmp_path / "valid", {"cat": 1})
    assert "more than one validation folder (val, valid)" in _user_error(tmp_path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"file,kind\nx.png,a\n", "needs a label column ('label' or 'class' or 'labels') in its header row; "
                                  "found: file, kind"),
        (b"imgs/a.png,a\n", "needs a path column ('path' or 'filename' or 'file') in its header row; "
                             "found: imgs/a.png, a"),
        (b"", "found: none"),
        (b"path,label\n\xff\xfe\xfa,a\n", "cannot read CSV"),
        (b"path,label,split\nimgs/a.png,a,holdout\n", "unknown split 'holdout'"),
    ],
)
def test_bad_csv(tmp_path: Path, content: bytes, expected: str) -> None:
    _image(tmp_path / "imgs" / "a.png")
    (tmp_path / "labels.csv").write_bytes(content)
    assert expected in _user_error(tmp_path / "labels.csv")


def test_csv_rows_without_path_or_label_and_duplicates_are_skipped(tmp_path: Path) -> None:
    rows = [(_image(tmp_path / f"{name}.png").name, name[0]) for name in ("a0", "a1", "b0", "b1")]
    rows += [("", "b"), ("a0.png", "a"), ("a1.png", "")]
    index = scan_dataset(_write_csv(tmp_path / "l.csv", rows, header="path,label"))
    assert len(index.samples) == 4
    reasons = sorted(s.reason for s in index.skipped)
    assert reasons == ["listed twice in CSV", "row without path or label", "row without path or label"]


def test_verification_decodes_every_file_off_the_main_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real_load = sources.load_rgb
    monkeypatch.setattr(
        sources, "load_rgb", lambda *a: threads.append(threading.current_thread().name) or real_load(*a)
    )
    index = scan_dataset(_classes(tmp_path, {"a": 3, "b": 3}))
    assert len(threads) == len(index.samples) == 6 and threading.main_thread().name not in threads
