"""Bounding boxes: CSV x1,y1,x2,y2 columns crop each image right after decoding, for every consumer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import COLOURS
from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.data.boxes import Box, crop_to
from transferkit.data.images import load_image
from transferkit.data.sources import scan_dataset
from transferkit.export.check import validation_images
from transferkit.features.extract import FeatureExtractor, View
from transferkit.runs.files import read_prediction_crops, read_predictions
from transferkit.runs.run import Run

GREY = (128, 128, 128)
BOX = (10, 20, 30, 44)  # x1, y1, x2, y2 inside a 48x64 (width x height) image


def boxed_image(path: Path, colour: tuple[int, int, int], box: tuple[int, int, int, int] = BOX,
                size: tuple[int, int] = (48, 64)) -> Path:
    """A grey image whose box region is a solid colour."""
    pixels = np.full((size[1], size[0], 3), GREY, dtype=np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = colour
    Image.fromarray(pixels).save(path)
    return path


def write_csv(path: Path, rows: list[str], header: str = "path,label,x1,y1,x2,y2") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def boxed_dataset(root: Path, per_class: int = 10) -> Path:
    """Two classes told apart only inside the box: outside it every image is the same grey."""
    root.mkdir(parents=True)
    rows = []
    for c, name in enumerate(("red", "blue")):
        for i in range(per_class):
            box = (4 + i, 6 + i, 28 + i, 40 + i)
            boxed_image(root / f"{name}_{i}.png", COLOURS[0 if c == 0 else 2], box)
            rows.append(f"{name}_{i}.png,{name},{','.join(map(str, box))}")
    return write_csv(root / "boxes.csv", rows)


def colours_of(image: Image.Image) -> set[tuple[int, ...]]:
    return {tuple(c) for c in np.asarray(image).reshape(-1, 3).tolist()}


def test_the_loaded_image_is_the_box(tmp_path: Path) -> None:
    path = boxed_image(tmp_path / "a.png", COLOURS[0])
    image = load_image(str(path), Box(*BOX))
    assert image.size == (20, 24) and colours_of(image) == {COLOURS[0]}


def test_a_margin_shows_the_border_and_is_clipped_at_the_image_edge(tmp_path: Path) -> None:
    path = boxed_image(tmp_path / "a.png", COLOURS[0])
    grown = load_image(str(path), Box(*BOX).with_margin(0.25))  # 5 px left/right, 6 px top/bottom
    assert grown.size == (30, 36) and colours_of(grown) == {COLOURS[0], GREY}
    assert np.asarray(grown)[18, 0].tolist() == list(GREY) and np.asarray(grown)[18, 15].tolist() == list(COLOURS[0])
    clipped = load_image(str(path), Box(*BOX).with_margin(2.0))  # 40 px each side: far past every edge
    assert clipped.size == (48, 64)
    assert crop_to(Image.new("RGB", (8, 8)), Box(-3, -3, 4, 4)).size == (4, 4)


def test_bad_boxes_are_skipped_with_reasons(tmp_path: Path) -> None:
    for i in range(4):
        boxed_image(tmp_path / f"{i}.png", COLOURS[i % 2])
    rows = ["0.png,a,10,20,30,44", "1.png,b,10,20,30,44", "2.png,a,1,2,3,44", "3.png,b,10,20,30,44",
            "0.png,b,x,20,30,44", "1.png,a,30,20,10,44", "2.png,b,10,20,30,99", "3.png,a,-1,20,30,44",
            "2.png,b,10,20,30,40"]
    index = scan_dataset(write_csv(tmp_path / "b.csv", rows), verify=True)
    reasons = sorted(s.reason for s in index.skipped)
    assert len(index.samples) == 5  # the same file with another box is another sample
    assert any("not four numbers" in r for r in reasons)
    assert any("empty: needs x1 < x2" in r for r in reasons)
    assert sum("outside the image (48x64)" in r for r in reasons) == 2
    assert {s.box for s in index.samples if s.path.endswith("2.png")} == {Box(1, 2, 3, 44), Box(10, 20, 30, 40)}


def test_box_columns_must_come_as_four(tmp_path: Path, capsys) -> None:
    boxed_image(tmp_path / "a.png", COLOURS[0])
    csv_path = write_csv(tmp_path / "p.csv", ["a.png,a,1,2"], header="path,label,x1,y1")
    code = run_cli(["train", str(csv_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "x2, y2" in err


def test_a_csv_whose_only_row_has_x2_below_x1_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    boxed_image(tmp_path / "a.png", COLOURS[0])
    csv_path = write_csv(tmp_path / "only.csv", ["a.png,a,30,20,10,44"])
    code = run_cli(["train", str(csv_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no images found" in err


def test_the_cache_tells_two_boxes_of_one_file_apart(tmp_path: Path, tiny_weights: str) -> None:
    import timm
    from safetensors.torch import load_file

    from transferkit.data.transforms import Preprocess, eval_transform
    from transferkit.models.classifier import HeadSpec, new_classifier
    from transferkit.progress import Reporter

    path = tmp_path / "two.png"
    pixels = np.full((64, 64, 3), GREY, dtype=np.uint8)
    pixels[:, :32] = COLOURS[0]
    pixels[:, 32:] = COLOURS[2]
    Image.fromarray(pixels).save(path)
    backbone = timm.create_model("test_efficientnet", pretrained=False)
    backbone.load_state_dict(load_file(tiny_weights))
    model = new_classifier(backbone, 1, HeadSpec()).eval()
    pre = Preprocess(32, "bilinear", 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    view = View(0, eval_transform(pre), {"preprocess": pre.to_dict(), "view": 0})
    crops = [Box(0, 0, 32, 64), Box(32, 0, 64, 64)]

    def extract():
        extractor = FeatureExtractor(model, "torch", 4, 0, Reporter(quiet=True), tmp_path / "cache")
        [features] = extractor([str(path)] * 2, [view], "features", crops)
        return features, extractor.computed

    first, computed = extract()
    assert computed == 2 and not np.allclose(first[0], first[1], atol=1e-4)
    again, computed_again = extract()
    assert computed_again == 0 and np.array_equal(first, again)  # both boxes came back from the cache


@pytest.fixture(scope="module")
def boxed_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str):
    root = tmp_path_factory.mktemp("boxes")
    data = boxed_dataset(root / "data")
    fast = dict(backbone="test_efficientnet", weights=tiny_weights, image_size=32, batch_size=8, workers=0,
                epochs_frozen=8, epochs_finetune=1, augment="none", quiet=True, lr=0.01)
    return api.train(data, root / "run", box_margin=0.1, **fast), data


def test_a_box_csv_trains_and_evaluates_on_the_crops(boxed_run) -> None:
    run, data = boxed_run
    split = json.loads((run.path / "split.json").read_text())
    assert len(split["boxes"]["val"]) == len(split["val"]) and all(len(b) == 4 for b in split["boxes"]["val"])
    assert run.meta["box_margin"] == 0.1
    index = scan_dataset(data)
    evaluated, _, _ = read_predictions(run.path / "predictions.csv", run.classes)
    crops = read_prediction_crops(run.path / "predictions.csv")
    assert set(zip(evaluated, crops, strict=True)) == {(s.path, s.box.with_margin(0.1)) for s in index.split("val")}
    paths = [s.path for s in index.split("val")]
    uncropped = run.probabilities(paths)
    cropped = run.probabilities(paths, [s.box.with_margin(0.1) for s in index.split("val")])
    assert not np.allclose(uncropped, cropped, atol=1e-4)  # the crop changes what the model sees
    assert run.metrics["n"] == len(paths)
    pixels, labels, _ = validation_images(run)  # export's check sees the crops, at the network's size
    assert pixels.shape[0] == len(paths) and labels is not None


def test_predict_from_the_dataset_csv_uses_the_crops(boxed_run, capsys) -> None:
    run, data = boxed_run
    assert run_cli(["predict", str(run.path), str(data), "--json", "--engine", "torch"]) == 0
    records = json.loads(capsys.readouterr().out)
    index = scan_dataset(data, trainable=False)
    assert [r["path"] for r in records] == [s.path for s in index.samples]
    assert [r["box"] for r in records] == [s.box.to_list() for s in index.samples]
    crops = [s.box.with_margin(0.1) for s in index.samples]
    expected = run.probabilities([s.path for s in index.samples], crops)
    assert np.allclose([r["probability"] for r in records], expected.max(axis=1), atol=1e-5)
    assert run_cli(["predict", str(run.path), str(data), "--engine", "torch"]) == 0  # text: each line names its box
    first = index.samples[0]
    box = ",".join(f"{v:g}" for v in first.box.to_list())
    assert capsys.readouterr().out.splitlines()[0].startswith(f"{first.path} [box {box}]: ")


@pytest.mark.parametrize("after_training", [True, False])
def test_the_report_similarity_compares_the_evaluated_crops(boxed_run, monkeypatch, after_training) -> None:
    """The embeddings come from a feature path (as right after training) or an eager pass (a loaded run): both
    get the evaluated crops."""
    import transferkit.report.images as report_images
    from transferkit.insight.similarity import embed_images
    from transferkit.report.images import Predictions, similarity_section

    trained, _ = boxed_run
    run = Run(trained.path)
    if after_training:  # the path train gives its report: features from an extractor
        from transferkit.features.extract import FeatureExtractor, clean_view, view_features
        from transferkit.progress import Reporter

        extract = FeatureExtractor(run.model, "torch", 8, 0, Reporter(quiet=True), None)
        run.plain_features = view_features(clean_view(run.preprocess), extract)
    paths, y_true, probs = read_predictions(run.path / "predictions.csv", run.classes)
    crops = read_prediction_crops(run.path / "predictions.csv")
    seen = {}

    def recording(run, paths, **options):
        seen.update(paths=paths, crops=options.get("crops"))
        return embed_images(run, paths, **options)

    def recorded_features(paths, crops):
        seen.update(paths=paths, crops=crops)
        return features(paths, crops)

    features = run.plain_features
    monkeypatch.setattr(report_images, "embed_images", recording)
    if after_training:
        monkeypatch.setattr(run, "plain_features", recorded_features)
    section = similarity_section(run, Predictions(paths, np.asarray(y_true), np.asarray(probs), crops))
    assert "uri" in section and seen["crops"] == [crops[paths.index(p)] for p in seen["paths"]]
    whole, cropped = (embed_images(run, seen["paths"], cache=False, crops=c) for c in (None, seen["crops"]))
    assert not np.allclose(whole, cropped, atol=1e-4)  # a crop is not the whole image to the network
