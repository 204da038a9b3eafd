"""auto spends time only on what it will use: where nothing is fine-tuned and the head is solved, no learning rate
is searched and no training step is timed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch

from transferkit.auto import orchestrate
from transferkit.auto.plan import measure_speeds
from transferkit.config import resolve_config
from transferkit.models.classifier import HeadSpec, new_classifier


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return new_classifier(timm.create_model("test_efficientnet"), 2, HeadSpec())


@pytest.mark.parametrize("epochs", [0, 1])
def test_the_training_step_is_timed_only_where_something_is_fine_tuned(epochs: int) -> None:
    model = tiny_model()
    cfg = resolve_config(None, None, epochs_finetune=epochs, batch_size=4, feature_engine="torch")
    speeds = measure_speeds(model, "1", 32, cfg, head=1e-4)
    assert speeds.inference > 0 and speeds.head == 1e-4
    assert (speeds.finetune > 0) == bool(epochs)
    assert any(p.requires_grad for p in model.backbone.parameters()) == bool(epochs)


@pytest.mark.parametrize(("settings", "searched"), [({"epochs_finetune": 0}, False),
                                                    ({"epochs_finetune": 0, "head_fit": "sgd"}, True),
                                                    ({"epochs_finetune": 1}, True)])
def test_the_head_rate_is_searched_only_where_a_rate_is_used(settings: dict, searched: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(orchestrate, "best_rate", lambda *args: calls.append(args) or (0.02, {0.02: 0.5}))
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    features = rng.normal(size=(40, 8)).astype(np.float32) + labels[:, None]
    backbone = SimpleNamespace(model=tiny_model(), pre=SimpleNamespace(image_size=32))
    probed = SimpleNamespace(features=features, backbone=backbone, candidate=SimpleNamespace(name="tiny", weights=None))
    cfg = resolve_config(None, None, batch_size=4, feature_engine="torch", **settings)
    chosen = orchestrate.finalist(probed, [], labels, 40, cfg)
    assert bool(calls) == searched
    assert chosen.choices["lr"] == (0.02 if searched else cfg.lr)
