"""The frozen-stage feature engines: OpenVINO and ONNX Runtime must reproduce eager PyTorch, or they are not used."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from transferkit import api
from transferkit.features import extract as features
from transferkit.features.extract import feature_engine
from transferkit.models.classifier import HeadSpec, new_classifier
from transferkit.progress import Reporter


def tiny_classifier():
    torch.manual_seed(0)
    return new_classifier(timm.create_model("test_efficientnet"), 3, HeadSpec()).eval()


def disagreeing(model, example):
    return lambda images: torch.zeros(len(images), 256)


def missing(model, example):
    raise ImportError("No module named 'openvino'")


@pytest.mark.parametrize("engine", ["openvino", "onnx"])
def test_compiled_engine_matches_eager_fp32(engine):
    model = tiny_classifier()
    run, name = feature_engine(model, torch.randn(4, 3, 48, 48), engine, Reporter(quiet=True))
    assert name == engine
    other = torch.randn(7, 3, 48, 48)  # another batch size (the graph's batch is dynamic), not a multiple of a chunk
    with torch.inference_mode():
        expected = model.embed(other)
    assert (run(other) - expected).abs().max() < 1e-4


def test_auto_prefers_openvino_on_cpu():
    _, name = feature_engine(tiny_classifier(), torch.randn(2, 3, 48, 48), "auto", Reporter(quiet=True))
    assert name == "openvino"


def test_auto_falls_back_to_onnx_when_openvino_is_missing_or_wrong(monkeypatch, capsys):
    for replacement, reason in ((missing, "OpenVINO unavailable"), (disagreeing, "OpenVINO features differ")):
        monkeypatch.setitem(features.COMPILED_ENGINES, "openvino", replacement)
        _, name = feature_engine(tiny_classifier(), torch.randn(2, 3, 48, 48), "auto", Reporter())
        assert name == "onnx"
        assert reason in capsys.readouterr().err


def test_engines_that_disagree_are_not_used(monkeypatch):
    for engine in ("openvino", "onnx"):
        monkeypatch.setitem(features.COMPILED_ENGINES, engine, disagreeing)
    for engine in ("auto", "openvino", "onnx"):
        _, name = feature_engine(tiny_classifier(), torch.randn(2, 3, 48, 48), engine, Reporter(quiet=True))
        assert name == "torch"


def test_torch_engine_when_asked():
    _, name = feature_engine(tiny_classifier(), torch.randn(2, 3, 48, 48), "torch", Reporter(quiet=True))
    assert name == "torch"


def test_every_engine_trains_the_same_head(dataset, tmp_path, fast):
    options = {**fast, "epochs_finetune": 0, "epochs_frozen": 5}
    runs = {engine: api.train(dataset, tmp_path / engine, feature_engine=engine, **options)
            for engine in ("openvino", "onnx", "torch")}
    weights = {engine: load_file(str(run.path / "model.safetensors")) for engine, run in runs.items()}
    for engine in ("openvino", "onnx"):
        assert max(float((weights[engine][k] - weights["torch"][k]).abs().max())
                   for k in weights["torch"] if k.startswith("head")) < 1e-3
        assert runs[engine].metrics["confusion_matrix"] == runs["torch"].metrics["confusion_matrix"]


# Two engines compiled and released in the order they were made (as garbage collection may), then a Python signal
# handler runs on the main thread: with a Core per engine, its signal stack was unmapped and the process died (0290).
RELEASED_ENGINES = """
import gc, os, signal, torch
from torch import nn
from transferkit.features.extract import inference_engine
from transferkit.progress import Reporter
module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
engines = [inference_engine(module, torch.randn(2, 3, 16, 16), "openvino", Reporter(quiet=True), "features")
           for _ in range(2)]
print([name for _, name in engines])
engines.pop(0); gc.collect(); engines.pop(0); gc.collect()
signal.signal(signal.SIGUSR1, lambda *_: print("handled"))
os.kill(os.getpid(), signal.SIGUSR1)
"""


def test_released_openvino_engines_leave_signal_handlers_working():
    done = subprocess.run([sys.executable, "-c", RELEASED_ENGINES], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["['openvino', 'openvino']", "handled"]
