"""The frozen-stage feature engine: ONNX Runtime must reproduce eager PyTorch, or it is not used."""

from __future__ import annotations

import timm
import torch
from safetensors.torch import load_file

from transferkit import api
from transferkit.features import feature_engine
from transferkit.models.classifier import HeadSpec, new_classifier
from transferkit.progress import Reporter


def tiny_classifier():
    torch.manual_seed(0)
    return new_classifier(timm.create_model("test_efficientnet"), 3, HeadSpec(), True).eval()


def test_onnx_engine_matches_eager_fp32():
    model = tiny_classifier()
    images = torch.randn(4, 3, 48, 48)
    run, name = feature_engine(model, images, "auto", Reporter(quiet=True))
    assert name == "onnx"
    other = torch.randn(6, 3, 48, 48)  # a different batch size: the exported graph has a dynamic batch
    with torch.inference_mode():
        expected = model.embed(other)
    assert (run(other) - expected).abs().max() < 1e-4


def test_onnx_engine_that_disagrees_is_not_used(monkeypatch):
    from transferkit import features

    monkeypatch.setattr(features, "_onnx", lambda model, example: (lambda images: torch.zeros(len(images), 256)))
    model = tiny_classifier()
    _, name = feature_engine(model, torch.randn(2, 3, 48, 48), "auto", Reporter(quiet=True))
    assert name == "torch"


def test_torch_engine_when_asked():
    _, name = feature_engine(tiny_classifier(), torch.randn(2, 3, 48, 48), "torch", Reporter(quiet=True))
    assert name == "torch"


def test_both_engines_train_the_same_head(dataset, tmp_path, fast):
    options = {**fast, "epochs_finetune": 0, "epochs_frozen": 5}
    onnx_run = api.train(dataset, tmp_path / "onnx", feature_engine="onnx", **options)
    torch_run = api.train(dataset, tmp_path / "torch", feature_engine="torch", **options)
    a, b = load_file(str(onnx_run.path / "model.safetensors")), load_file(str(torch_run.path / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("head")) < 1e-3
    assert onnx_run.metrics["confusion_matrix"] == torch_run.metrics["confusion_matrix"]
