"""How feature maps are pooled (decision 0298): max for a CNN by default, recorded in the run and followed by every
consumer, cached apart from average-pooled features, refused in one line where a backbone pools its own way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from tests.test_cli import fails_with
from transferkit import api
from transferkit.data.transforms import Preprocess
from transferkit.errors import UserError
from transferkit.features.extract import FeatureExtractor, clean_view
from transferkit.models.classifier import HeadSpec, new_classifier
from transferkit.progress import Reporter
from transferkit.runs.run import Run


def classifier(pool: str | None, depths: tuple[int, ...] = (), name: str = "test_efficientnet") -> nn.Module:
    torch.manual_seed(0)
    return new_classifier(timm.create_model(name, pretrained=False), 3, HeadSpec(), depths, pool).eval()


@pytest.mark.parametrize(("pool", "reduce"), [("max", torch.amax), ("avg", torch.mean), ("auto", torch.amax)])
def test_every_level_is_pooled_the_chosen_way(pool, reduce):
    model, images = classifier(pool, (1, 2)), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, intermediates = model.backbone.forward_intermediates(images, indices=[1, 2])
        expected = torch.cat([reduce(m, dim=(2, 3)) for m in [*intermediates, final]], dim=1)
        torch.testing.assert_close(model.embed(images), expected)
    assert model.global_pool == ("max" if pool == "auto" else pool)


def test_a_backbone_that_pools_its_own_way_keeps_it_under_auto_and_refuses_max():
    vit = classifier("auto", name="test_vit")
    assert vit.global_pool is None and vit.backbone.global_pool == "token"
    with pytest.raises(UserError, match="pool max: .* use pool auto"):
        classifier("max", name="test_vit")


def test_max_and_average_pooled_features_are_cached_apart(dataset: Path, tmp_path: Path):
    paths = sorted(str(p) for p in dataset.rglob("*.png"))
    # 64 px: a 2x2 last map (at 32 px it is 1x1, where the maximum is the average)
    view = [clean_view(Preprocess(64, "bilinear", 1.0, (0.5,) * 3, (0.5,) * 3))]
    results = {}
    for pool in ("avg", "max", "avg"):
        extract = FeatureExtractor(classifier(pool), "torch", 8, 0, Reporter(quiet=True), tmp_path / "cache")
        [features] = extract(paths, view, "features")
        results.setdefault(pool, []).append((features, extract.computed))
    (avg, first), (again, second) = results["avg"]
    [(maxed, computed)] = results["max"]
    assert (first, computed, second) == (len(paths), len(paths), 0)  # max did not read avg's rows, nor spoil them
    assert torch.equal(avg, again) and not torch.allclose(avg, maxed)


def test_the_pooling_is_recorded_and_a_loaded_run_follows_it(dataset: Path, tmp_path: Path, fast: dict):
    trained = api.train(dataset, tmp_path / "run", **{**fast, "epochs_finetune": 0})
    meta_path = tmp_path / "run" / "meta.json"
    assert json.loads(meta_path.read_text())["global_pool"] == "max"
    loaded = Run(tmp_path / "run")
    assert loaded.model.global_pool == "max" and loaded.model.backbone.global_pool.pool_type == "max"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), trained.model.cpu()(images))
    # a run from before the choice (no global_pool in meta.json) was average-pooled, and loads so
    meta = json.loads(meta_path.read_text())
    del meta["global_pool"]
    meta_path.write_text(json.dumps(meta))
    assert Run(tmp_path / "run").model.backbone.global_pool.pool_type == "avg"


def test_an_average_pooled_run_says_so(dataset: Path, tmp_path: Path, fast: dict):
    api.train(dataset, tmp_path / "run", **{**fast, "epochs_finetune": 0, "pool": "avg"})
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["global_pool"] == "avg"
    assert Run(tmp_path / "run").model.backbone.global_pool.pool_type == "avg"


def test_an_unknown_pooling_or_one_a_backbone_cannot_do_is_one_line(capsys, dataset: Path, tmp_path: Path):
    fails_with(capsys, ["train", str(dataset), "--out", str(tmp_path / "a"), "--pool", "median"],
               "pool must be one of auto, max, avg")
    vit = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False).state_dict(), str(vit))
    fails_with(capsys, ["train", str(dataset), "--out", str(tmp_path / "b"), "--backbone", "test_vit", "--weights",
                        str(vit), "--pool", "max"], "pool max", "use pool auto")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
