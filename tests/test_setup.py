"""`make test` sets up what its tests need: Debian's chromium, installed when the machine can, else one line, exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "tools" / "ensure_chromium.sh"


def run_script(tmp_path: Path, chromium: Path, tools: list[str]) -> subprocess.CompletedProcess:
    """The script with only `tools` on PATH (no apt-get unless given), checking for `chromium`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "TRANSFERKIT_CHROMIUM": str(chromium), "HOME": os.environ.get("HOME", "/")}
    return subprocess.run([shutil.which("bash"), str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def test_present_chromium_needs_nothing(tmp_path):
    browser = tmp_path / "chromium"
    browser.write_text("#!/bin/sh\n")
    browser.chmod(0o755)
    done = run_script(tmp_path, browser, ["id"])
    assert done.returncode == 0 and done.stderr == ""


def test_missing_chromium_without_apt_is_one_line_and_exit_2(tmp_path):
    done = run_script(tmp_path, tmp_path / "missing" / "chromium", ["id"])
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "no apt-get" in done.stderr and "Chromium" in done.stderr
