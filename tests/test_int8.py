"""int8 that is right on every x86 CPU: 7-bit weights (no int16 saturation without VNNI), and a self-check carried in
the file that the loader repeats, so a file whose kernels answer differently here is never used."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.test_cli import fails_with
from tests.test_export import image_paths, train_run
from transferkit import parity
from transferkit.cli.main import run_cli
from transferkit.errors import UserError
from transferkit.export.onnx import export_run
from transferkit.predictor import OnnxPredictor, load_predictor
from transferkit.runs.run import Run


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_weights) -> Path:
    """A 3-class run with both exports, fp32 and int8."""
    root = train_run(tmp_path_factory.mktemp("int8"), 3, tiny_weights)
    export_run(root / "run")
    export_run(root / "run", int8=True)
    return root


def int8_weights(path: Path) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and t.dims and np.prod(t.dims) > 1]


def test_int8_weights_use_seven_bits_so_no_cpu_saturates(exported):
    # u8 x s8 pairs summed in int16 (CPUs without VNNI) overflow only when |weight| > 64: 2 * 255 * 64 < 32768.
    weights = int8_weights(exported / "run" / "model.int8.onnx")
    assert weights, "no int8 weights in the export"
    assert min(w.min() for w in weights) >= -64 and max(w.max() for w in weights) <= 64
    assert max(np.abs(w).max() for w in weights) >= 60  # the 7-bit range is used, not wasted


def test_int8_file_carries_a_self_check_that_passes_where_it_was_made(exported):
    predictor = OnnxPredictor(exported / "run" / "model.int8.onnx")
    assert parity.PROBES_KEY in predictor.metadata
    assert parity.probe_failure(predictor.metadata[parity.PROBES_KEY], predictor._session, None) is None
    paths = image_paths(exported)
    agree = predictor.probabilities(paths).argmax(1) == Run(exported / "run").probabilities(paths).argmax(1)
    assert agree.mean() >= parity.INT8_MIN_AGREEMENT


def rewrite_int8(path: Path, change) -> None:
    model = onnx.load(str(path))
    change(model)
    onnx.save(model, str(path))


def skew_weights(model: onnx.ModelProto) -> None:
    """What a CPU whose int8 kernels saturate computes, in effect: integer weights that are not the stored ones."""
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.INT8 and np.prod(tensor.dims) > 1:
            values = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(np.clip(values.astype(np.int16) * 2, -128, 127).astype(np.int8),
                                                    tensor.name))


def test_int8_that_disagrees_on_this_cpu_falls_back_to_fp32_and_says_why(exported, tmp_path, capsys):
    run_dir = shutil.copytree(exported / "run", tmp_path / "run")
    rewrite_int8(run_dir / "model.int8.onnx", skew_weights)
    predictor = load_predictor(run_dir)
    assert predictor.path.name == "model.onnx"
    err = capsys.readouterr().err
    assert "self-check" in err and "using model.onnx instead" in err and len(err.strip().splitlines()) == 1
    # Asked for by name, the unsafe file is refused in one line (exit 2), never served.
    fails_with(capsys, ["predict", str(run_dir), str(exported / "data"), "--engine", "int8"],
               "not safe to use here", "self-check")


def test_int8_without_a_self_check_is_not_trusted(exported, tmp_path, capsys):
    run_dir = shutil.copytree(exported / "run", tmp_path / "run")
    rewrite_int8(run_dir / "model.int8.onnx", lambda model: model.metadata_props.__delitem__(
        next(i for i, p in enumerate(model.metadata_props) if p.key == parity.PROBES_KEY)))
    with pytest.raises(UserError, match="no self-check images"):
        OnnxPredictor(run_dir / "model.int8.onnx")
    (run_dir / "model.onnx").unlink()
    assert isinstance(load_predictor(run_dir), Run)
    assert "using PyTorch instead" in capsys.readouterr().err


def test_self_check_catches_drift_without_a_changed_decision():
    pixels = np.random.default_rng(0).random((4, 3, 8, 8)).astype(np.float32)
    reference = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8]], dtype=np.float32)
    pixels = np.rint(pixels * 255).astype(np.float32) / 255
    stored = parity.make_probes(pixels, reference, reference + 0.01, None)
    assert parity.probe_failure(stored, lambda _: reference + 0.02, None) is None
    assert "off by up to 0.10" in parity.probe_failure(stored, lambda _: reference + [[-0.1, 0.1]], None)
    flipped = parity.probe_failure(stored, lambda _: reference[:, ::-1], None)
    assert "disagrees with fp32 on 4 of its 4" in flipped


def test_int8_export_cli_reports_its_check(exported, tmp_path, capsys):
    run_dir = shutil.copytree(exported / "run", tmp_path / "run")
    assert run_cli(["export", str(run_dir), "--format", "onnx", "--int8", "--out", str(tmp_path / "q.onnx")]) == 0
    assert "agreement with PyTorch" in capsys.readouterr().err
    assert parity.PROBES_KEY in OnnxPredictor(tmp_path / "q.onnx").metadata
