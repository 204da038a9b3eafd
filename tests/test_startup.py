"""Every command's --help answers without loading PyTorch, timm, OpenVINO or ONNX Runtime (seconds of imports)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

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


@pytest.fixture
def places(tmp_path):
    """A data folder, a finished run (as far as its files go), an empty folder and a path that does not exist."""
    data = tmp_path / "data" / "cats"
    data.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "a.jpg")
    run = tmp_path / "run"
    run.mkdir()
    (run / "meta.json").write_text("{}")
    (run / "model.safetensors").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    return {"DATA": str(tmp_path / "data"), "RUN": str(run), "EMPTY": str(tmp_path / "empty"),
            "MISSING": str(tmp_path / "missing"), "IMG": str(data / "a.jpg"), "OUT": str(tmp_path / "out")}


@pytest.mark.parametrize(("argv", "message"), [
    ("train MISSING --out OUT", "path does not exist"),
    ("train DATA --out RUN", "already holds a run"),
    ("train DATA --out OUT --optimizer nope", "optimizer must be one of"),
    ("train DATA --out OUT --seed -1", "seed must be between 0 and 4294967295"),
    ("train DATA --out OUT --image-size 100000", "image_size must be between 16 and 2048 pixels"),
    ("auto MISSING --out OUT", "path does not exist"),
    ("auto DATA --out RUN", "already holds a run"),
    ("auto DATA --out OUT --time-budget 0", "--time-budget must be a number of minutes more than 0, not 0"),
    ("auto DATA --out OUT --time-budget inf", "--time-budget must be a number of minutes more than 0, not inf"),
    ("train DATA --out OUT --lr inf", "lr must be a finite number"),
    ("train DATA --out OUT --lr 1e39", "lr must be a finite number"),
    ("auto DATA --out OUT --seed -1", "seed must be between"),
    ("doctor MISSING", "path does not exist"),
    ("doctor DATA --pool median", "pool must be one of"),
    ("doctor DATA --near-threshold 1.5", "near threshold must be in"),
    ("doctor DATA --seed -1", "seed must be between"),
    ("doctor DATA --image-size 100000", "image size must be between 16 and 2048 pixels"),
    ("doctor DATA --val-split 1.5", "bad val_split 1.5"),
    ("evaluate MISSING DATA", "no such run folder"),
    ("evaluate EMPTY DATA", "not a complete run folder"),
    ("evaluate RUN MISSING", "path does not exist"),
    ("export EMPTY", "not a complete run folder"),
    ("export RUN --format nope", "unknown export format 'nope'"),
    ("export RUN --format torchscript --int8", "--int8 needs --format onnx"),
    ("export RUN --out OUT.txt", "--out must end in .onnx, not 'out.txt'"),
    ("export RUN --format torchscript --out OUT.onnx", "--out must end in .pt or .pth, not 'out.onnx'"),
    ("lr-find DATA --out OUT.txt", "--out must end in .png, not 'out.txt'"),
    ("report MISSING", "no such run folder"),
    ("report RUN --data MISSING", "path does not exist"),
    ("predict RUN MISSING", "no such file or folder"),
    ("predict EMPTY IMG --engine torch", "not a complete run folder"),
    ("explain EMPTY IMG --out OUT", "not a complete run folder"),
    ("explain RUN MISSING --out OUT", "no such file or folder"),
    ("similarity EMPTY IMG --out OUT.png", "not a complete run folder"),
    ("embed MISSING DATA --out OUT.npz", "no such run folder"),
    ("embed RUN MISSING --out OUT.npz", "path does not exist"),
    ("embed RUN DATA --out OUT.txt", "--out must end in .npz or .parquet"),
    ("search RUN MISSING --gallery DATA", "no such file or folder"),
])
def test_bad_paths_answer_before_any_heavy_library_loads(places, argv, message):
    """A typo in a path costs a fraction of a second, not the seconds of importing PyTorch: one line, exit 2."""
    args = [places.get(word, word) for word in argv.split()]
    args = [places["OUT"] + a.removeprefix("OUT") if a.startswith("OUT.") else a for a in args]
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("transferkit: error: ") and message in line
    assert done.stdout.strip().splitlines()[-1] == "LOADED []"


def test_an_ensemble_is_finished_only_when_every_member_is(tmp_path):
    from transferkit.errors import UserError
    from transferkit.runs.folder import check_run_folder

    members = [{"path": f"members/{name}", "weight": 0.5} for name in ("a", "b")]
    (tmp_path / "meta.json").write_text(json.dumps({"ensemble": {"members": members}}))
    for name in ("a", "b"):
        (tmp_path / "members" / name).mkdir(parents=True)
        (tmp_path / "members" / name / "meta.json").write_text("{}")
    (tmp_path / "members" / "a" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"not a complete run folder .*members/b"):
        check_run_folder(tmp_path)
    (tmp_path / "members" / "b" / "model.safetensors").write_bytes(b"")
    check_run_folder(tmp_path)
