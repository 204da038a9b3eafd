"""Every command's --help answers without loading PyTorch, timm, OpenVINO or ONNX Runtime (seconds of imports)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "timm", "openvino", "onnxruntime", "sklearn", "matplotlib")
PROBE = """
import sys
from transferkit.cli.main import run_cli
code = run_cli(sys.argv[1:])
print("LOADED", [name for name in {heavy!r} if name in sys.modules])
sys.exit(code)
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["predict", "--help"], ["serve", "--help"],
                                  ["evaluate", "--help"], ["export", "--help"], ["doctor", "--help"],
                                  ["auto", "--help"], ["backbones", "--help"]])
def test_help_loads_no_heavy_library(argv):
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "LOADED []"
