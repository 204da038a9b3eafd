"""The feature cache: same head with and without it, content-keyed invalidation, corrupt segments rebuilt."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from transferkit import api
from transferkit.data.content import file_digest
from transferkit.data.transforms import Preprocess, eval_transform, train_transform
from transferkit.features.cache import FeatureStore
from transferkit.features.extract import FeatureExtractor, View
from transferkit.models.classifier import HeadSpec, new_classifier
from transferkit.options import AUGMENT_PRESETS
from transferkit.progress import Reporter


def extractor(cache_root: Path | None) -> FeatureExtractor:
    torch.manual_seed(0)
    model = new_classifier(timm.create_model("test_efficientnet"), 3, HeadSpec()).eval()
    return FeatureExtractor(model, "torch", 8, 0, Reporter(quiet=True), cache_root)


def views() -> list[View]:
    pre = Preprocess(32, "bilinear", 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    augment = AUGMENT_PRESETS["strong"]
    return [View(0, eval_transform(pre), {"view": 0}),
            View(1, train_transform(pre, augment), {"view": 1, "augment": dataclasses.asdict(augment)})]


def image_paths(dataset: Path) -> list[str]:
    return sorted(str(p) for p in dataset.rglob("*.png"))


def test_second_pass_comes_from_the_cache_and_equals_the_first(dataset, tmp_path):
    paths = image_paths(dataset)
    first = extractor(tmp_path / "cache")
    a = first(paths, views(), "x")
    assert first.computed == 2 * len(paths)
    second = extractor(tmp_path / "cache")
    b = second(paths, views(), "x")
    assert second.computed == 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    uncached = extractor(None)
    c = uncached(paths, views(), "x")  # augmented views are seeded by content: recomputing gives the same
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, c, strict=True))


def test_editing_one_image_recomputes_only_that_image(dataset, tmp_path):
    paths = image_paths(dataset)
    extractor(tmp_path / "cache")(paths, views(), "x")
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(paths[3])  # edit one file in place
    (dataset / "class_0" / "new.png").write_bytes(Path(paths[0]).read_bytes())  # a copy: same content, cached
    (dataset / "class_1" / "added.png").write_bytes(b"")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(dataset / "class_1" / "added.png")  # a new image
    again = extractor(tmp_path / "cache")
    again(image_paths(dataset), views(), "x")
    assert again.computed == 2 * 2  # the edited and the added image, in both views


def test_corrupt_segment_is_detected_and_rebuilt(dataset, tmp_path):
    paths = image_paths(dataset)
    [clean] = extractor(tmp_path / "cache")(paths, views()[:1], "x")
    [segment] = list((tmp_path / "cache").rglob("*.npy"))
    data = bytearray(segment.read_bytes())
    data[-8:] = b"\x7f" * 8  # flip the last feature values
    segment.write_bytes(bytes(data))
    rebuilt = extractor(tmp_path / "cache")
    [again] = rebuilt(paths, views()[:1], "x")
    assert rebuilt.computed == len(paths)
    assert torch.equal(clean, again)


def test_a_segment_whose_keys_were_changed_is_rebuilt(dataset, tmp_path):
    """The keys name the rows: rows checksummed under another order of keys would be other images' features."""
    paths = image_paths(dataset)
    [clean] = extractor(tmp_path / "cache")(paths, views()[:1], "x")
    [index] = [p for p in (tmp_path / "cache").rglob("*.json") if p.name != "space.json"]
    meta = json.loads(index.read_text())
    index.write_text(json.dumps({**meta, "keys": meta["keys"][3:] + meta["keys"][:3]}))
    rebuilt = extractor(tmp_path / "cache")
    [again] = rebuilt(paths, views()[:1], "x")
    assert rebuilt.computed == len(paths) and torch.equal(clean, again)


def test_a_cache_folder_that_cannot_be_written_is_a_warning_not_a_crash(dataset, tmp_path, fast, capsys):
    (tmp_path / "a_file").write_text("")
    run = api.train(dataset, tmp_path / "run", cache_dir=str(tmp_path / "a_file" / "cache"),
                    **{**fast, "epochs_finetune": 0})
    assert run.metrics["n"] > 0
    assert "a_file is a file, not a folder; features are computed without a cache" in capsys.readouterr().err


def test_cached_and_uncached_stage1_train_the_same_head(dataset, tmp_path, fast):
    options = {**fast, "epochs_finetune": 0, "epochs_frozen": 4, "augment": "light", "feature_views": 2}
    cold = api.train(dataset, tmp_path / "cold", cache_dir=str(tmp_path / "c"), **options)
    warm = api.train(dataset, tmp_path / "warm", cache_dir=str(tmp_path / "c"), **options)
    uncached = api.train(dataset, tmp_path / "none", cache=False, **options)
    heads = [{k: v for k, v in load_file(str(run.path / "model.safetensors")).items() if k.startswith("head")}
             for run in (cold, warm, uncached)]
    for other in heads[1:]:
        assert max(float((heads[0][k] - other[k]).abs().max()) for k in other) < 1e-4
    assert cold.metrics["confusion_matrix"] == warm.metrics["confusion_matrix"] == uncached.metrics["confusion_matrix"]


def test_shard_rows_are_read_back_exactly_in_any_order(tmp_path):
    store = FeatureStore(tmp_path, {"space": 1}, Reporter(quiet=True))
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((n, 6)).astype(np.float32) for n in (5, 9)]
    keys = [[f"{b}-{i}" for i in range(len(block))] for b, block in enumerate(blocks)]
    for block_keys, block in zip(keys, blocks, strict=True):
        with store.writer(block_keys) as shard:
            for part in np.array_split(block, 3):  # streamed in batches
                shard.write(part)
    for meta in tmp_path.rglob("*.json"):
        if meta.name != "space.json":  # a valid .npy whose recorded digest is the file's
            assert json.loads(meta.read_text())["sha256"] == file_digest(meta.with_suffix(".npy"))
    all_keys, all_rows = keys[0] + keys[1], np.concatenate(blocks)
    table = FeatureStore(tmp_path, {"space": 1}, Reporter(quiet=True)).table(all_keys)
    picks = np.array([13, 0, 1, 2, 7, 7, 4, 5, 6])  # across shards, runs of neighbours, a repeat
    assert np.array_equal(table.take(picks), all_rows[picks])
    assert np.array_equal(table.take(np.arange(len(table))), all_rows)


def test_interrupted_extraction_leaves_no_segment(dataset, tmp_path, monkeypatch):
    paths = image_paths(dataset)
    broken = extractor(tmp_path / "cache")
    calls = []

    def fail_on_second_batch(images):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return torch.zeros(len(images), 4)

    broken._run = fail_on_second_batch
    with pytest.raises(KeyboardInterrupt):
        broken(paths, views()[:1], "x")
    folder = next((tmp_path / "cache" / "features").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["space.json"]  # no shard, no temp file
    again = extractor(tmp_path / "cache")
    again(paths, views()[:1], "x")
    assert again.computed == len(paths)


def test_progress_counts_the_views_asked_for(dataset, tmp_path, monkeypatch):
    """auto's symmetry check asks for views 1..7 (the clean view is already cached): its bars read 1/7 … 7/7."""
    labels = []
    monkeypatch.setattr(Reporter, "bar", lambda self, label, total: labels.append(label) or contextlib.nullcontext(
        lambda n, status="": None))
    pre = Preprocess(32, "bilinear", 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    turned = [View(k, eval_transform(pre), {"view": k}) for k in (1, 2, 3)]
    extractor(None)(image_paths(dataset), turned, "symmetries")
    assert labels == ["symmetries 1/3", "symmetries 2/3", "symmetries 3/3"]
