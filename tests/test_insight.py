"""explain, similarity, embed and search: embeddings mean something (same class closer than other classes, an
image is its own nearest neighbour), the feature cache spares recomputation without mixing backbones, files
written decode, and every bad input is one line with exit code 2."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_class_folders
from tests.test_cli import fails_with
from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.insight.similarity import (
    Embedder,
    backbone_source,
    cosine_matrix,
    embed_images,
    nearest,
    plot_similarity,
    run_source,
    short_names,
)
from transferkit.runs.run import Run

PER_CLASS = 4  # images per class that the similarity tests compare


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str) -> Run:
    """One 3-class run for the module (coloured squares on noise), fine-tuned so its backbone is no longer the
    ImageNet one; its data folder lies next to it. Seconds."""
    root = tmp_path_factory.mktemp("insight")
    data = make_class_folders(root / "data")
    return api.train(data, root / "run", backbone="test_efficientnet", weights=tiny_weights, image_size=32,
                     batch_size=8, workers=0, epochs_frozen=15, epochs_finetune=1, lr=0.03, patience=0,
                     augment="none", quiet=True)


def data_dir(run: Run) -> Path:
    return run.path.parent / "data"


def class_images(run: Run) -> list[str]:
    return [str(data_dir(run) / f"class_{c}" / f"img_{i:03d}.png") for c in range(3) for i in range(PER_CLASS)]


def test_identical_images_are_fully_similar_and_the_matrix_is_symmetric(trained: Run, tmp_path: Path) -> None:
    first, other = class_images(trained)[:2]
    shutil.copy(first, copy := tmp_path / "copy.png")
    embeddings = embed_images(trained, [first, str(copy), other])
    assert embeddings.shape == (3, trained.model.num_features)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    matrix = cosine_matrix(embeddings)
    assert matrix[0, 1] == pytest.approx(1, abs=1e-5) and matrix[0, 2] < 0.9999
    np.testing.assert_allclose(np.diag(matrix), 1, atol=1e-5)
    assert np.array_equal(matrix, matrix.T) and matrix.min() >= -1 and matrix.max() <= 1


def test_same_class_images_are_more_similar_than_other_classes(trained: Run) -> None:
    matrix = cosine_matrix(embed_images(trained, class_images(trained)))
    classes = np.repeat(np.arange(3), PER_CLASS)
    same = classes[:, None] == classes[None, :]
    off_diagonal = ~np.eye(len(classes), dtype=bool)
    within, across = matrix[same & off_diagonal].mean(), matrix[~same].mean()
    assert within > across + 0.1, (within, across)


def test_cached_embeddings_equal_fresh_ones_and_run_and_backbone_keep_their_own(trained: Run, tiny_weights: str,
                                                                               tmp_path: Path) -> None:
    """The cache key holds the backbone's weights: the fine-tuned run and the ImageNet backbone never share rows."""
    paths = class_images(trained)
    cache = tmp_path / "cache"
    fresh = Embedder(run_source(trained), None)(paths)
    first, second = Embedder(run_source(trained), cache), Embedder(run_source(trained), cache)
    np.testing.assert_allclose(first(paths), fresh, atol=1e-6)
    np.testing.assert_allclose(second(paths), fresh, atol=1e-6)
    assert (first.computed, second.computed) == (len(paths), 0)
    imagenet = Embedder(backbone_source("test_efficientnet", tiny_weights), cache)
    untouched = imagenet(paths)
    assert imagenet.computed == len(paths)  # nothing taken from the run's rows
    assert not np.allclose(untouched, fresh, atol=1e-3)


def test_nearest_ranks_by_cosine() -> None:
    gallery = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    assert [row for row, _ in nearest(np.array([0.0, 2.0]), gallery, 3)] == [2, 1, 0]
    assert nearest(np.array([1.0, 0.0]), gallery, 10)[0] == (0, pytest.approx(1.0))
    assert len(nearest(np.array([1.0, 0.0]), gallery, 10)) == len(gallery)


@pytest.mark.parametrize("count", [3, 40], ids=["annotated", "too-many-to-annotate"])
def test_plot_similarity_writes_a_png_to_a_path_or_a_file_object(count: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    matrix = cosine_matrix(rng.normal(size=(count, 8)))
    labels = [f"/data/a/img_{i:03d}.png" for i in range(count)]
    plot_similarity(matrix, labels, tmp_path / "sim.png")
    buffer = io.BytesIO()
    plot_similarity(matrix, labels, buffer)
    for source in (tmp_path / "sim.png", io.BytesIO(buffer.getvalue())):
        with Image.open(source) as image:
            assert image.format == "PNG" and min(image.size) > 100
            image.load()


def test_short_names_keep_the_folder_only_where_file_names_repeat() -> None:
    assert short_names(["/x/a/1.png", "/x/b/1.png", "/x/b/2.png"]) == ["a/1.png", "b/1.png", "2.png"]
    assert len(short_names(["/x/" + "n" * 60 + ".png"])[0]) == 24


def test_explain_command_writes_an_overlay_per_image(trained: Run, tmp_path: Path, capsys, monkeypatch) -> None:
    images = class_images(trained)[:2]
    assert run_cli(["explain", str(trained.path), *images, "--out", str(tmp_path / "cams"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    predictions, _ = trained.predict(images)
    assert [r["path"] for r in results] == images
    assert [(r["label"], r["explained"]) for r in results] == [(p["label"], p["label"]) for p in predictions]
    assert [r["probability"] for r in results] == pytest.approx([p["probability"] for p in predictions], abs=1e-5)
    assert len({r["overlay"] for r in results}) == 2  # two img_000.png-like names never overwrite each other
    for result in results:
        with Image.open(result["overlay"]) as image:
            assert image.size == (32, 32)
    monkeypatch.chdir(tmp_path)  # and no --out: runs/RUN-explain
    assert run_cli(["explain", str(trained.path), images[0], "--class", "class_2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{images[0]}: {predictions[0]['label']} ") and line.endswith("_gradcam.png")
    assert f"-> runs/{trained.path.name}-explain/" in line
    assert ("(explaining class_2)" in line) == (predictions[0]["label"] != "class_2")


def test_similarity_command_prints_the_matrix_and_writes_the_heatmap(trained: Run, tmp_path: Path, capsys) -> None:
    folder = str(data_dir(trained) / "class_0")
    extra = class_images(trained)[PER_CLASS]
    assert run_cli(["similarity", str(trained.path), folder, extra, "--out", str(tmp_path / "s.png"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["paths"]) == 13 and result["paths"][-1] == extra
    matrix = np.array(result["matrix"])
    assert matrix.shape == (13, 13) and np.allclose(np.diag(matrix), 1, atol=1e-5)
    np.testing.assert_allclose(matrix, cosine_matrix(embed_images(trained, result["paths"])), atol=1e-5)
    with Image.open(tmp_path / "s.png") as image:
        assert image.format == "PNG"


def test_similarity_with_a_backbone_and_no_run(trained: Run, tiny_weights: str, tmp_path: Path, capsys) -> None:
    images = class_images(trained)[:2]
    argv = ["similarity", "--backbone", "test_efficientnet", "--weights", tiny_weights, *images,
            "--out", str(tmp_path / "s.png"), "--json"]
    assert run_cli(argv) == 0
    matrix = np.array(json.loads(capsys.readouterr().out)["matrix"])
    source = backbone_source("test_efficientnet", tiny_weights)
    np.testing.assert_allclose(matrix, cosine_matrix(Embedder(source, None)(images)), atol=1e-5)


def test_embed_round_trip_keeps_paths_and_labels(trained: Run, tmp_path: Path) -> None:
    out = tmp_path / "emb.npz"
    assert run_cli(["embed", str(trained.path), str(data_dir(trained)), "--out", str(out)]) == 0
    saved = np.load(out)
    paths, labels = saved["paths"].tolist(), saved["labels"].tolist()
    assert saved["embeddings"].shape == (36, trained.model.num_features) and len(paths) == 36
    assert sorted(paths) == sorted(str(p) for p in data_dir(trained).rglob("*.png"))
    assert labels == [Path(p).parent.name for p in paths]
    np.testing.assert_allclose(saved["embeddings"], embed_images(trained, paths), atol=1e-5)


def test_embed_a_plain_folder_has_empty_labels(trained: Run, tmp_path: Path) -> None:
    out = tmp_path / "plain.npz"
    assert run_cli(["embed", str(trained.path), str(data_dir(trained) / "class_1"), "--out", str(out)]) == 0
    saved = np.load(out)
    assert len(saved["paths"]) == 12 and set(saved["labels"].tolist()) == {""}


def test_embed_parquet_needs_pyarrow(trained: Run, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    fails_with(capsys, ["embed", str(trained.path), str(data_dir(trained)), "--out", str(tmp_path / "e.parquet")],
               "pyarrow")
    assert not (tmp_path / "e.parquet").exists()


def test_embed_parquet_round_trip(trained: Run, tmp_path: Path) -> None:
    import pyarrow.parquet as parquet  # a dev dependency: the round trip must run in CI, not be skipped

    out = tmp_path / "emb.parquet"
    assert run_cli(["embed", str(trained.path), str(data_dir(trained) / "class_1"), "--out", str(out)]) == 0
    table = parquet.read_table(out).to_pydict()
    assert len(table["path"]) == 12 and np.array(table["embedding"]).shape == (12, trained.model.num_features)


def test_search_finds_the_query_first_and_reuses_the_cache(trained: Run, tmp_path: Path, capsys) -> None:
    query = class_images(trained)[PER_CLASS + 1]
    cache = tmp_path / "cache"
    argv = ["search", str(trained.path), query, "--gallery", str(data_dir(trained)), "-k", "3", "--json",
            "--cache-dir", str(cache)]
    assert run_cli(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in results] == [1, 2, 3]
    assert results[0]["path"] == query and results[0]["similarity"] == pytest.approx(1, abs=1e-5)
    assert results[0]["similarity"] >= results[1]["similarity"] >= results[2]["similarity"]
    assert all(Path(r["path"]).parent.name == "class_1" for r in results[1:])  # the next nearest: its own class
    shards = sorted(cache.rglob("*.npy"))
    assert shards  # the first search cached the gallery
    assert run_cli(argv) == 0 and json.loads(capsys.readouterr().out) == results
    assert sorted(cache.rglob("*.npy")) == shards  # the second computed nothing, so it appended no shard


def test_search_prints_rank_similarity_and_path(trained: Run, capsys) -> None:
    query = class_images(trained)[0]
    assert run_cli(["search", str(trained.path), query, "--gallery", str(data_dir(trained) / "class_0")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[0].split() == ["1", "1.0000", query]
    overlapping = ["--gallery", str(data_dir(trained)), "--gallery", str(data_dir(trained) / "class_0")]
    assert run_cli(["search", str(trained.path), query, *overlapping, "-k", "4", "--json"]) == 0
    found = [r["path"] for r in json.loads(capsys.readouterr().out)]
    assert len(found) == len(set(found)) == 4  # a file in two --gallery folders is one candidate


def bad_inputs(run: Path, data: Path, empty: Path, out: Path) -> list[tuple[list[str], str]]:
    image = str(data / "class_0" / "img_000.png")
    return [
        (["explain", str(out / "nope"), image, "--out", str(out)], "no such run folder"),
        (["explain", str(data), image, "--out", str(out)], "not a complete run folder"),
        (["explain", str(run), str(data / "missing.png"), "--out", str(out)], "no such file or folder"),
        (["explain", str(run), str(empty), "--out", str(out)], "no readable images"),
        (["explain", str(run), image, "--out", str(out), "--class", "dog"], "class_0, class_1, class_2"),
        (["explain", str(run), image, "--out", image], "is not a folder"),
        (["similarity", str(run), image, "--out", str(out / "sim.jpg")], ".png"),
        (["similarity", str(run), "--out", str(out / "sim.png")], "run folder and then images"),
        (["similarity", str(run), image, "--weights", "w.safetensors", "--out", str(out / "s.png")], "--backbone"),
        (["similarity", "--backbone", "test_efficientnet", str(run), "--out", str(out / "s.png")], "not both"),
        (["embed", str(run), str(data), "--out", str(out / "e.csv")], ".npz or .parquet"),
        (["embed", str(run), str(empty), "--out", str(out / "e.npz")], "no readable images"),
        (["search", str(run), image, "--gallery", str(data), "-k", "0"], "-k"),
        (["search", str(run), str(data), "--gallery", str(data)], "one image file"),
        (["search", str(run), image, "--gallery", str(empty)], "no readable images"),
    ]


def test_every_bad_input_is_one_line_and_exit_2(trained: Run, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    for argv, fragment in bad_inputs(trained.path, data_dir(trained), empty, tmp_path / "out"):
        fails_with(capsys, argv, fragment)
    assert not (tmp_path / "out").exists()  # nothing was written for any of them
