"""atomic_path / atomic_write: the file is complete or absent, with the permissions a plain open() gives."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from transferkit.errors import UserError
from transferkit.fileio import atomic_path, atomic_write, check_suffix, output_folder


def test_written_file_has_umask_permissions_and_no_temp_file_remains(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "sub" / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "sub" / "a.json").read_text() == "{}"
    assert stat.S_IMODE((tmp_path / "sub" / "a.json").stat().st_mode) == 0o666 & ~old
    assert os.listdir(tmp_path / "sub") == ["a.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model.bin"
    atomic_write(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_previous_one(tmp_path):
    target = tmp_path / "meta.json"
    atomic_write(target, "old")

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match=r"cannot write .*meta.json: No space left on device"), \
            atomic_path(target) as tmp:
        full(tmp)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["meta.json"]


def test_an_unwritable_folder_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write"):
        atomic_write(tmp_path / "file" / "inside.json", "{}")  # its "folder" is a file


def test_a_file_where_a_folder_should_be_is_named(tmp_path):
    """`-o photo.jpg/model.onnx` said "File exists"; the message names the file in the way."""
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match=r"photo\.jpg is a file, not a folder"):
        atomic_write(tmp_path / "photo.jpg" / "deeper" / "model.onnx", "data")
    with pytest.raises(UserError, match=r"photo\.jpg is a file, not a folder"):
        output_folder(tmp_path / "photo.jpg" / "cams")


@pytest.mark.parametrize(("name", "ok"), [("model.onnx", True), ("MODEL.ONNX", True), ("notes.txt", False),
                                          ("model", False)])
def test_an_out_file_must_say_what_it_holds(tmp_path, name, ok):
    if ok:
        check_suffix(tmp_path / name, (".onnx",))
    else:
        with pytest.raises(UserError, match=f"--out must end in .onnx, not '{name}'"):
            check_suffix(tmp_path / name, (".onnx",))
