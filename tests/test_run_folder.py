"""Where a run goes without --out: runs/NAME, then NAME-2, …, claimed when chosen and removed if left empty."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from transferkit.cli.output import default_run_folder, remove_if_empty


@pytest.mark.parametrize(("data", "name"), [("photos/", "photos"), ("sheets/labels.csv", "labels"),
                                            ("https://host/d/shards-{000..009}.tar", "shards-_000..009"),
                                            ("https://host/d/", "d")])
def test_default_run_folder_names(tmp_path, monkeypatch, data, name):
    monkeypatch.chdir(tmp_path)
    assert default_run_folder(data) == Path("runs") / name
    (tmp_path / "runs" / f"{name}-2").mkdir()
    assert default_run_folder(data) == Path("runs") / f"{name}-3"
    assert default_run_folder(data, "-auto") == Path("runs") / f"{name}-auto"


def test_default_run_folders_are_claimed_and_unused_ones_removed(tmp_path, monkeypatch):
    """Two commands started together get two folders: each is created when chosen, not when first written."""
    monkeypatch.chdir(tmp_path)
    first, second = default_run_folder("photos/"), default_run_folder("photos/")
    assert (first, second) == (Path("runs/photos"), Path("runs/photos-2")) and first.is_dir() and second.is_dir()
    (first / "meta.json").write_text("{}")
    remove_if_empty(first)
    remove_if_empty(second)
    assert first.is_dir() and not second.exists()


def test_a_failed_train_leaves_no_empty_run_folder(tmp_path, monkeypatch):
    one_class = tmp_path / "one" / "a"
    one_class.mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (32, 32), (index * 40, 0, 0)).save(one_class / f"{index}.png")
    monkeypatch.chdir(tmp_path)
    done = subprocess.run([sys.executable, "-m", "transferkit", "train", "one"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "only one class found" in done.stderr
    assert not (tmp_path / "runs" / "one").exists()
