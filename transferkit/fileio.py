"""Files that are complete or absent: written under a temporary name in the same folder, synced, then renamed.

A crash, a full disk or Ctrl-C mid-write leaves the previous file (or none), never half of one that a later
reader would trust.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transferkit.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` for the block to write; it becomes `path` only if the block completes,
    with the permissions a plain open() would have given (mkstemp's are owner-only). A disk that fills up or a
    folder that turns read-only is a UserError naming the file (one line for the user, not a traceback)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {why_not(path.parent, exc)}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def remove_partial_writes(folder: Path) -> None:
    """The temporary files atomic_path leaves in `folder` when the process is killed mid-write (kill -9, power
    loss): removed once the run they belong to is finished."""
    for partial in folder.glob(".*.*.tmp"):
        partial.unlink(missing_ok=True)


def check_suffix(out: Path, suffixes: tuple[str, ...]) -> None:
    """An --out file whose name says what is written there (a typo never replaces a file of another kind)."""
    if out.suffix.lower() not in suffixes:
        raise UserError(f"--out must end in {' or '.join(suffixes)}, not '{out.name}'")


def check_out_free(out: Path, overwrite: bool) -> None:
    """Never clobber a finished run by accident (a folder without meta.json is a crashed run, reused)."""
    if (out / "meta.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a run: choose another --out or pass --overwrite")


def output_folder(folder: Path) -> Path:
    """Create an output folder now and prove it writable, so a path that cannot be written fails (as a UserError)
    before any work is done."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} exists and is not a folder (it is a file)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to {folder}: {why_not(folder, exc)}") from None
    return folder


def why_not(folder: Path, exc: OSError) -> str:
    """Why `folder` cannot be made or written in: a file where it or a folder above it should be ("File exists"
    says neither), else the system's reason."""
    in_the_way = next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)
    return f"{in_the_way} is a file, not a folder" if in_the_way else exc.strerror or str(exc)


def atomic_write(path: Path, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
