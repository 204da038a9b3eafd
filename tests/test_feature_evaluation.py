"""After training, evaluation and the validation choices read the features (engine and cache) instead of running
the network eagerly: the metrics must be the eager ones, for a frozen and for a fine-tuned backbone. The report's
similarity heatmap reads the same features."""

from __future__ import annotations

import pytest

from transferkit import api, tuning
from transferkit.features import extract
from transferkit.report import images as report_images
from transferkit.runs import run as run_module
from transferkit.runs.run import Run

DIHEDRAL = {"augment": "dihedral", "tta": "dihedral"}


@pytest.mark.parametrize(("epochs_finetune", "views"),
                         [(0, {}), (1, {}), (0, DIHEDRAL), (1, {**DIHEDRAL, "tta": "auto"})])
def test_evaluation_from_features_equals_evaluation_from_images(dataset, tmp_path, fast, epochs_finetune, views,
                                                                 monkeypatch):
    """Test-time views included: their logits come from each symmetry's features, not from an eager pass."""
    options = {**fast, "epochs_finetune": epochs_finetune, "lr": 3e-2, "finetune_lr": 1e-2, "test_split": 0.25,
               **views}

    def no_eager_pass(*_args, **_kwargs):
        raise AssertionError("an eager pass over images after training")

    compile_engine, engines = extract.inference_engine, []

    def recorded(*args, **kwargs):
        engine, name = compile_engine(*args, **kwargs)
        engines.append(name)
        return engine, name

    with monkeypatch.context() as patched:
        patched.setattr(extract, "inference_engine", recorded)
        for module in (run_module, tuning):
            patched.setattr(module, "infer_logits", no_eager_pass)
        patched.setattr(report_images, "embed_images", no_eager_pass)
        trained = api.train(dataset, tmp_path / "run", **options)
    from_features = trained.metrics
    # a fine-tuned backbone's features are computed after training, on a compiled engine (decision 0290)
    assert "torch" not in engines and (engines or not epochs_finetune)
    eager = Run(tmp_path / "run")  # a fresh load has no feature path: every image through PyTorch
    assert eager.view_logits is None and eager.plain_features is None
    assert "Cosine similarity of the model's embeddings" in (tmp_path / "run" / "report.html").read_text()
    from_images = eager.evaluate(dataset, write=False)
    assert from_features["split"] == from_images["split"] == "test"
    assert from_features["accuracy"] == from_images["accuracy"]
    assert from_features["confusion_matrix"] == from_images["confusion_matrix"]
    assert from_features["loss"] == pytest.approx(from_images["loss"], abs=1e-4)
    assert from_features["tta"] == from_images["tta"] == (views.get("tta", "none") if views.get("tta") != "auto"
                                                          else trained.tta)
