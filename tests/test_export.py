"""`transferkit export` and predicting from the export: the file reproduces PyTorch or is never written.

Runs are trained once per module (tiny test_efficientnet, 32 px) and only ever copied before being altered.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import transferkit.cli.export  # noqa: F401  (registers `export` until cli.main imports it itself)
from tests.conftest import make_class_folders
from tests.test_cli import fails_with
from transferkit import api, parity
from transferkit.cli.main import run_cli
from transferkit.errors import UserError
from transferkit.export import onnx as export
from transferkit.export.onnx import ProbabilityModel, export_run
from transferkit.predictor import OnnxPredictor, load_predictor
from transferkit.runs.run import Run


def train_run(root: Path, classes: int, tiny_weights: str) -> Path:
    data = make_class_folders(root / "data", classes=classes, per_class=20)
    api.train(data, root / "run", backbone="test_efficientnet", weights=tiny_weights, image_size=32, batch_size=8,
              workers=0, epochs_frozen=3, epochs_finetune=1, augment="none", quiet=True)
    return root


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory, tiny_weights) -> Path:
    """A 3-class run (12 validation images) exported to RUN/model.onnx; its data folder is next to it."""
    root = train_run(tmp_path_factory.mktemp("multiclass"), 3, tiny_weights)
    export_run(root / "run")
    return root


@pytest.fixture(scope="module")
def binary(tmp_path_factory, tiny_weights) -> Path:
    """A 2-class run (one logit) that is never exported into its own folder."""
    return train_run(tmp_path_factory.mktemp("binary"), 2, tiny_weights)


def image_paths(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "data").rglob("*.png"))


@pytest.mark.parametrize("name", ["multiclass", "binary"])
def test_fp32_export_matches_pytorch_with_dynamic_batch(name, request, tmp_path):
    root = request.getfixturevalue(name)
    run = Run(root / "run")
    report = export_run(run.path, out=tmp_path / "m.onnx")
    assert report.check.max_abs_diff <= parity.FP32_TOLERANCE and report.check.agreement == 1.0

    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["classes"]) == run.classes
    assert json.loads(meta["preprocessing"]) == run.preprocess.to_dict()
    assert meta["task"] == ("binary" if name == "binary" else "multiclass")

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    wrapper = ProbabilityModel(run).eval()
    for batch in (1, 5):
        pixels = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        got = session.run(None, {"pixels": pixels.numpy()})[0]
        with torch.inference_mode():
            expected = wrapper(pixels).numpy()
        assert got.shape == (batch, len(run.classes))
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
        assert np.abs(got - expected).max() <= 1e-4

    # End to end from files: the predictor's resize/crop + in-graph normalisation equal the run's transform.
    paths = image_paths(root)
    predictor = OnnxPredictor(tmp_path / "m.onnx")
    assert predictor.classes == run.classes
    assert np.abs(predictor.probabilities(paths) - run.probabilities(paths)).max() <= 1e-4
    images = [Image.open(p).convert("RGB") for p in paths[:3]]
    assert np.abs(predictor.probabilities_of_images(images) - run.probabilities_of_images(images)).max() <= 1e-4


def test_samplewise_center_is_inside_the_graph(multiclass, tmp_path):
    run_dir = shutil.copytree(multiclass / "run", tmp_path / "run")
    meta = json.loads((run_dir / "meta.json").read_text())
    (run_dir / "meta.json").write_text(json.dumps({**meta, "samplewise_center": True}))
    export_run(run_dir, out=tmp_path / "m.onnx")
    paths = image_paths(multiclass)
    expected = Run(run_dir).probabilities(paths)
    assert np.abs(OnnxPredictor(tmp_path / "m.onnx").probabilities(paths) - expected).max() <= 1e-4


def test_validation_labels_from_split_json_or_folder_names(multiclass, tmp_path):
    run_dir = shutil.copytree(multiclass / "run", tmp_path / "run")
    split = json.loads((run_dir / "split.json").read_text())
    _, labels, _ = export.validation_images(Run(run_dir))  # folder layout: the parent folder is the class
    assert list(labels) == [Run(run_dir).classes.index(Path(p).parent.name) for p in split["val"]]
    (run_dir / "split.json").write_text(json.dumps({**split, "labels": {"val": ["class_2"] * len(split["val"])}}))
    _, labels, _ = export.validation_images(Run(run_dir))
    assert list(labels) == [2] * len(split["val"])


def test_int8_export_passes_its_check_and_prints_it(multiclass, capsys, tmp_path):
    run_dir = shutil.copytree(multiclass / "run", tmp_path / "run")
    assert run_cli(["export", str(run_dir), "--format", "onnx", "--int8"]) == 0
    err = capsys.readouterr().err
    assert "agreement with PyTorch 100.0%" in err and "img/s" in err and "MB" in err
    int8 = run_dir / "model.int8.onnx"
    assert int8.stat().st_size < 0.7 * (run_dir / "model.onnx").stat().st_size
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert "QuantizeLinear" in ops
    paths = image_paths(multiclass)
    agree = OnnxPredictor(int8).probabilities(paths).argmax(1) == Run(run_dir).probabilities(paths).argmax(1)
    assert agree.mean() >= 0.95


def test_int8_calibration_uses_every_batch(tmp_path):
    """The input's quantization range must cover the first calibration batch too, whatever the batch count."""
    class Wrapped(torch.nn.Module):  # a conv under the "/model/" name scope that quantize_int8 quantizes
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.model(pixels)

    pixels = torch.rand(32, 3, 8, 8)  # 4 calibration batches of 8
    pixels[:8] *= 10  # only the first batch reaches 10
    export.export_onnx(Wrapped().eval(), pixels[:1], tmp_path / "m.onnx")
    export.quantize_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", pixels)
    graph = onnx.load(str(tmp_path / "m.int8.onnx")).graph
    [quantize] = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "pixels"]
    scale = next(onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name == quantize.input[1])
    assert float(scale) * 255 >= 9.0


@pytest.mark.parametrize(("flags", "threshold", "value"), [(["--int8"], "INT8_MIN_AGREEMENT", 1.01),
                                                           ([], "FP32_TOLERANCE", -1.0)])
def test_export_that_fails_its_check_is_refused_and_not_written(binary, capsys, monkeypatch, tmp_path, flags,
                                                                threshold, value):
    monkeypatch.setattr(parity, threshold, value)
    out = tmp_path / "model.onnx"
    fails_with(capsys, ["export", str(binary / "run"), "--out", str(out), *flags], "refused", "nothing written")
    assert list(tmp_path.iterdir()) == []  # neither the model nor a temp file


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated upstream
def test_torchscript_export(binary, tmp_path):
    report = export_run(binary / "run", "torchscript", out=tmp_path / "m.pt")
    assert report.check.max_abs_diff <= parity.FP32_TOLERANCE
    extra = {"transferkit.json": ""}
    module = torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    assert json.loads(extra["transferkit.json"])["classes"] == Run(binary / "run").classes
    assert module(torch.rand(3, 3, 32, 32)).shape == (3, 2)


def test_onnx_sessions_use_the_process_thread_budget(multiclass, tmp_path, monkeypatch):
    # serve --workers N gives each process cores/N threads; ONNX Runtime must not take every core regardless.
    export_run(multiclass / "run", out=tmp_path / "m.onnx")
    for threads in (1, 2):
        monkeypatch.setenv("TRANSFERKIT_THREADS", str(threads))
        options = OnnxPredictor(tmp_path / "m.onnx")._session.session.get_session_options()
        assert options.intra_op_num_threads == threads


def predict_json(capsys, run_dir: Path, data: Path, engine: str) -> list[dict]:
    assert run_cli(["predict", str(run_dir), str(data), "--engine", engine, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_engines_give_the_same_labels(multiclass, capsys):
    results = {engine: predict_json(capsys, multiclass / "run", multiclass / "data", engine)
               for engine in ("onnx", "torch", "auto")}
    onnx_, torch_ = results["onnx"], results["torch"]
    assert len(onnx_) == len(image_paths(multiclass))
    assert [r["path"] for r in onnx_] == [r["path"] for r in torch_]
    assert [r["label"] for r in onnx_] == [r["label"] for r in torch_]
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(onnx_, torch_, strict=True)) <= 1e-4
    assert results["auto"] == onnx_  # auto picks the export when there is one (no int8 export here)
    assert isinstance(load_predictor(multiclass / "run"), OnnxPredictor)


def test_predict_with_onnx_engine_needs_an_export(binary, capsys):
    fails_with(capsys, ["predict", str(binary / "run"), str(binary / "data"), "--engine", "onnx"],
               "no model.onnx", "transferkit export")
    assert isinstance(load_predictor(binary / "run", "auto"), Run)


def test_stale_export_is_not_used(multiclass, tmp_path):
    run_dir = shutil.copytree(multiclass / "run", tmp_path / "run")
    weights = load_file(str(run_dir / "model.safetensors"))
    changed = {k: v + 0.01 if k.startswith("head") else v for k, v in weights.items()}
    save_file(changed, str(run_dir / "model.safetensors"))
    with pytest.raises(UserError, match="other weights"):
        load_predictor(run_dir, "onnx")
    assert isinstance(load_predictor(run_dir, "auto"), Run)


def test_auto_engine_prefers_a_current_int8_export(multiclass, tmp_path, capsys):
    run_dir = shutil.copytree(multiclass / "run", tmp_path / "run")
    fails_with(capsys, ["predict", str(run_dir), str(multiclass / "data"), "--engine", "int8"],
               "no model.int8.onnx", "--int8")
    export_run(run_dir, int8=True)
    assert load_predictor(run_dir).path.name == "model.int8.onnx"
    # An int8 file left from other weights is skipped for the fp32 export that is current.
    int8 = OnnxPredictor(run_dir / "model.int8.onnx")
    stale = onnx.load(str(int8.path))
    next(p for p in stale.metadata_props if p.key == "weights_digest").value = "0" * 64
    onnx.save(stale, str(int8.path))
    assert load_predictor(run_dir).path.name == "model.onnx"
    assert "other weights" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["export", "{tmp}/missing"], "no such run folder"),
        (["export", "{run}", "--format", "tflite"], "unknown export format 'tflite'"),
        (["export", "{run}", "--format", "torchscript", "--int8"], "--int8 needs --format onnx"),
        (["predict", "{run}", "{run}", "--engine", "tpu"], "unknown engine 'tpu'"),
        (["predict", "{tmp}/missing", "{run}", "--engine", "onnx"], "no such run folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(binary, capsys, tmp_path, argv, fragment):
    argv = [a.format(tmp=tmp_path, run=binary / "run") for a in argv]
    fails_with(capsys, argv, fragment)


def test_a_refused_int8_export_and_predict_point_the_same_way_out(binary, capsys, monkeypatch, tmp_path):
    """No circle: the refusal and predict's missing-int8 message both name the fp32 export and --engine onnx."""
    monkeypatch.setattr(parity, "INT8_MIN_AGREEMENT", 1.01)
    run_dir = shutil.copytree(binary / "run", tmp_path / "run")
    fails_with(capsys, ["export", str(run_dir), "--int8"], "refused", "does not quantise well", "--engine onnx")
    message = fails_with(capsys, ["predict", str(run_dir), str(binary / "data"), "--engine", "int8"],
                         "no model.int8.onnx", "where it was refused", "--engine onnx")
    assert "first" not in message


def reproduce_from_metadata(model_path: Path, image_path: Path) -> np.ndarray:
    """A user's own runtime, written from the export's metadata and docs/preprocessing.md alone: PIL, numpy, ORT."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    pre = json.loads(session.get_modelmeta().custom_metadata_map["preprocessing"])
    size, resample = pre["image_size"], getattr(Image.Resampling, pre["interpolation"].upper())
    short = int(size / pre["crop_pct"])
    image = Image.open(image_path)
    image.draft(image.mode, (short, short))  # a JPEG decodes at the smallest scale still >= R on both sides
    image = image.convert("RGB")
    width, height = image.size
    new = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    if new != image.size:
        image = image.resize(new, resample=resample)
    left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    return session.run(None, {"pixels": pixels.transpose(2, 0, 1)[None]})[0][0]


@pytest.mark.parametrize("shape", [(307, 172), (45, 70), (36, 36), (640, 480)])  # 640 x 480: decoded at 1/8
def test_the_documented_preprocessing_reproduces_transferkits_probabilities(multiclass, tmp_path, shape):
    rng = np.random.default_rng(shape[0])
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (shape[1], shape[0], 3), dtype=np.uint8)).save(path, quality=90)
    model = multiclass / "run" / "model.onnx"
    rule = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert "centre-crop" in rule.custom_metadata_map["preprocessing_rule"]
    ours = reproduce_from_metadata(model, path)
    np.testing.assert_allclose(ours, OnnxPredictor(model).probabilities([str(path)])[0], atol=1e-6)
    np.testing.assert_allclose(ours, Run(multiclass / "run").probabilities([str(path)])[0], atol=1e-5)
