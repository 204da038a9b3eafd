"""`transferkit doctor`: planted problems are found, with their files; a clean dataset reports nothing.

Duplicates and leakage are checked with the real Lite0 (its default threshold was chosen on it) on tiles of photos;
mislabeling with the tiny random backbone on coloured squares, which it separates from pooled features."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFilter

from tests.conftest import make_class_folders, make_image
from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.data.sources import Sample
from transferkit.doctor import DoctorOptions, diagnose, quality
from transferkit.doctor.checks import class_balance, leakage, near_duplicates
from transferkit.doctor.mislabel import label_issues, likely_mislabeled
from transferkit.doctor.quality import image_issues

PHOTOS = {"cat": skimage.data.chelsea, "coffee": skimage.data.coffee, "astronaut": skimage.data.astronaut}
CLEAN_FINDINGS = {"skipped": 0, "exact_duplicates": 0, "near_duplicates": 0, "leakage": 0, "tiny_images": 0,
                  "image_issues": 0, "mislabeled": 0, "class_imbalance": 0, "findings": 0}


def photo_tiles(photo: np.ndarray, count: int, side: int, rng: np.random.Generator) -> list[Image.Image]:
    """Non-overlapping tiles of one photo: distinct images of one class."""
    image = Image.fromarray(photo).convert("RGB")
    cells = [(x, y) for x in range(image.width // side) for y in range(image.height // side)]
    rng.shuffle(cells)
    return [image.crop((x * side, y * side, (x + 1) * side, (y + 1) * side)) for x, y in cells[:count]]


def make_tiles_dataset(root: Path) -> Path:
    """train/ and val/ of 96-px photo tiles, 8 + 2 per class."""
    rng = np.random.default_rng(0)
    for name, photo in PHOTOS.items():
        for i, tile in enumerate(photo_tiles(photo(), 10, 96, rng)):
            folder = root / ("train" if i < 8 else "val") / name
            folder.mkdir(parents=True, exist_ok=True)
            tile.save(folder / f"{name}_{i}.png")
    return root


def reencoded(image: Image.Image, scale: float, quality: int) -> bytes:
    small = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def plant_problems(root: Path) -> dict[str, str]:
    """One of each problem, by name -> the planted file (absolute, as the report writes paths)."""
    train, val = root / "train", root / "val"
    planted = {
        "exact": train / "cat" / "cat_0_copy.png",
        "leak": val / "coffee" / "leaked.png",
        "photo": train / "astronaut" / "photo.png",
        "near": val / "astronaut" / "photo_small.jpg",
        "tiny": train / "cat" / "tiny.png",
        "broken": train / "coffee" / "broken.jpg",
        "blurred": train / "coffee" / "blurred.png",
        "dark": val / "cat" / "dark.png",
    }
    shutil.copy(train / "cat" / "cat_0.png", planted["exact"])
    shutil.copy(train / "coffee" / "coffee_1.png", planted["leak"])
    photo = Image.fromarray(skimage.data.astronaut())
    photo.save(planted["photo"])
    planted["near"].write_bytes(reencoded(photo, 0.75, 85))  # resized to 384 px and JPEG re-encoded
    Image.open(train / "cat" / "cat_2.png").resize((16, 16)).save(planted["tiny"])
    planted["broken"].write_bytes(b"not a jpeg")
    # the whole coffee photo at tile size, blurred: CleanVision's blur score needs edges to lose (a blurred flat tile
    # of the cup scores as sharp as before: decision 0240)
    whole = Image.fromarray(skimage.data.coffee()).resize((96, 96), Image.Resampling.BICUBIC)
    whole.filter(ImageFilter.GaussianBlur(4)).save(planted["blurred"])
    Image.eval(Image.open(train / "cat" / "cat_4.png"), lambda value: value // 8).save(planted["dark"])
    return {name: str(path) for name, path in planted.items()}


def paths(files: list[dict]) -> set[str]:
    return {f["path"] for f in files}


@pytest.fixture(scope="module")
def lite0_reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict[str, str], Path]:
    """Reports on clean tiles and on the same tiles with problems planted (their features come from the cache)."""
    root = tmp_path_factory.mktemp("doctor-tiles")
    clean = make_tiles_dataset(root / "clean")
    shutil.copytree(clean, root / "planted")
    planted = plant_problems(root / "planted")
    options = DoctorOptions(engine="torch", workers=0, quiet=True)
    return diagnose(clean, options), diagnose(root / "planted", options), planted, root / "planted"


def test_clean_dataset_reports_nothing(lite0_reports):
    clean, *_ = lite0_reports
    assert clean["summary"] == CLEAN_FINDINGS
    assert clean["notes"] == []
    assert clean["images"] == 30 and clean["backbone"]["name"] == "tf_efficientnet_lite0"
    assert clean["class_balance"]["counts"] == {"astronaut": 10, "cat": 10, "coffee": 10}


def test_planted_duplicates_and_leaks_are_found(lite0_reports):
    _, report, planted, root = lite0_reports
    exact_groups = [paths(group["files"]) for group in report["exact_duplicates"]]
    assert sorted(exact_groups, key=sorted) == sorted(
        [{str(root / "train/cat/cat_0.png"), planted["exact"]},
         {str(root / "train/coffee/coffee_1.png"), planted["leak"]}], key=sorted)
    [near] = report["near_duplicates"]
    assert paths(near["files"]) == {planted["photo"], planted["near"]}
    assert near["similarity"] >= report["settings"]["near_threshold"]
    leaks = {leak["kind"]: leak for leak in report["leakage"]}
    assert set(leaks) == {"exact", "near"} and len(report["leakage"]) == 2
    assert leaks["exact"]["train"] == [str(root / "train/coffee/coffee_1.png")]
    assert leaks["exact"]["held_out"] == [{"path": planted["leak"], "split": "val"}]
    assert leaks["near"]["train"] == [planted["photo"]]
    assert leaks["near"]["held_out"] == [{"path": planted["near"], "split": "val"}]


def test_planted_tiny_and_unreadable_files_are_found(lite0_reports):
    _, report, planted, _ = lite0_reports
    assert report["settings"]["min_side"] == 224 // 4  # Lite0's input size / 4 is above the 32 px default
    assert [(t["path"], t["width"], t["height"]) for t in report["tiny_images"]] == [(planted["tiny"], 16, 16)]
    assert report["skipped"] == [{"path": planted["broken"], "reason": "not an image"}]


def test_planted_blurred_and_darkened_images_are_found(lite0_reports):
    _, report, planted, _ = lite0_reports
    issues = {f["path"]: f["issues"] for f in report["image_issues"]}
    assert "blurry" in issues[planted["blurred"]]
    assert "dark" in issues[planted["dark"]]
    assert set(issues) <= set(planted.values())  # no clean tile is flagged
    assert report["summary"]["image_issues"] == len(issues)


def grayscale(found: list[dict]) -> list[str]:
    return [f["path"] for f in found if "grayscale" in f["issues"]]


def test_grayscale_is_flagged_among_colour_images_only(tmp_path):
    rng = np.random.default_rng(0)
    *colour, last = photo_tiles(skimage.data.chelsea(), 7, 64, rng)
    for i, tile in enumerate(colour):
        tile.save(tmp_path / f"colour_{i}.png")
    last.convert("L").save(tmp_path / "gray.png")
    samples = [Sample(str(path), "a", "train") for path in sorted(tmp_path.glob("*.png"))]
    found = image_issues(samples, workers=0)
    assert grayscale(found) == [str(tmp_path / "gray.png")]
    assert image_issues(samples, workers=2) == found  # CleanVision's process pool sees the same samples
    for sample in samples:
        Image.open(sample.path).convert("L").save(sample.path)
    assert grayscale(image_issues(samples, workers=0)) == []  # a grayscale dataset is not a dataset of odd images


def test_odd_size_is_judged_on_each_files_own_size_and_the_rest_on_scaled_pixels(tmp_path):
    """A 2048 px photo among 250-295 px ones decodes at 1/8 for the pixel checks (256 px: no odder than the rest),
    yet is the one odd size (decision 0295)."""
    skimage_photo = Image.fromarray(skimage.data.chelsea())  # 451 x 300
    for i in range(10):
        side = 250 + 5 * i
        skimage_photo.crop((i * 15, 0, i * 15 + side, side)).save(tmp_path / f"tile_{i}.jpg", quality=90)
    skimage_photo.resize((2048, 2048)).save(tmp_path / "huge.jpg", quality=90)
    samples = [Sample(str(path), "a", "train") for path in sorted(tmp_path.glob("*.jpg"))]
    assert [f["path"] for f in image_issues(samples, workers=0)] == [str(tmp_path / "huge.jpg")]
    assert image_issues(samples, workers=0)[0]["issues"] == ["odd_size"]
    pixels = quality.SampleImages(samples)
    assert pixels[[s.path for s in samples].index(str(tmp_path / "huge.jpg"))][0].size == (256, 256)


@pytest.fixture
def tiny_options(tiny_weights: str) -> dict:
    return dict(backbone="test_efficientnet", weights=tiny_weights, image_size=32, workers=0, engine="torch",
                quiet=True)


@pytest.fixture
def squares(tmp_path: Path) -> tuple[Path, Path, str]:
    """Clean coloured squares, and a copy where an image of class_0 sits in class_1's folder."""
    clean = make_class_folders(tmp_path / "clean", classes=3, per_class=12)
    shutil.copytree(clean, tmp_path / "planted")
    moved = tmp_path / "planted" / "class_1" / "from_class_0.png"
    shutil.move(tmp_path / "planted" / "class_0" / "img_005.png", moved)
    return clean, tmp_path / "planted", str(moved)


def test_planted_wrong_label_is_the_top_suspect(squares, tiny_options):
    clean, planted, moved = squares
    healthy = diagnose(clean, DoctorOptions(**tiny_options))
    assert healthy["mislabeled"] == [] and not any("agrees with" in note for note in healthy["notes"])
    found = diagnose(planted, DoctorOptions(**tiny_options))
    suspects = found["mislabeled"]
    # 35 of the 36 labels are right and the squares separate: the model agrees with about 97% of them
    assert any(re.search(r"agrees with 9\d% of the labels out of fold", note) for note in found["notes"])
    top = suspects[0]
    assert (top["path"], top["label"], top["suggested"]) == (moved, "class_1", "class_0")
    assert top["probability"] > 0.5 > top["label_probability"]
    assert [s["margin"] for s in suspects] == sorted((s["margin"] for s in suspects), reverse=True)


def test_cleanlab_flags_contradicted_labels_and_suggests_the_likeliest_other_class():
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1, 2], 20)
    probs = np.full((60, 3), 0.05)
    probs[np.arange(60), truth] = 0.9
    probs = probs + rng.uniform(0, 0.02, probs.shape)
    probs /= probs.sum(axis=1, keepdims=True)
    given = truth.copy()
    given[[3, 45]] = [2, 1]  # two flipped labels: a 0 labelled 2, a 2 labelled 1
    assert label_issues(probs, given) == [(3, 0), (45, 2)]
    assert label_issues(probs, truth) == []


def test_mislabel_check_leaves_out_classes_too_small_for_cross_validation():
    rng = np.random.default_rng(0)
    centres = {"a": np.eye(8)[0], "b": np.eye(8)[1], "c": np.eye(8)[2]}
    labels = ["a"] * 6 + ["b"] * 6 + ["c"]
    samples = [Sample(f"/x/{i}.png", label, "train") for i, label in enumerate(labels)]
    vectors = np.stack([centres[label] + 0.05 * rng.standard_normal(8) for label in labels])
    suspects, notes = likely_mislabeled(samples, vectors, seed=0)
    assert suspects == [] and len(notes) == 1 and "'c'" in notes[0]
    _, notes = likely_mislabeled(samples[:6], vectors[:6], seed=0)
    assert "skipped" in notes[-1]


def test_near_groups_chain_pairs_and_count_exact_copies_once():
    samples = [Sample(f"/d/{name}.png", "a", split) for name, split in
               [("a", "train"), ("a_copy", "val"), ("b", "train"), ("c", "train"), ("far", "train")]]
    contents = [[0, 1], [2], [3], [4]]  # a and a_copy are identical files
    vectors = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.96, 0.28, 0.0], [0.85, 0.53, 0.0], [0.0, 0.0, 1.0]])
    # a-b 0.96 and b-c 0.964 link a, its copy, b and c; a-c (0.85) is below the threshold but chained in
    [group] = near_duplicates(samples, contents, vectors, threshold=0.95)
    assert paths(group["files"]) == {"/d/a.png", "/d/a_copy.png", "/d/b.png", "/d/c.png"}
    assert group["similarity"] == pytest.approx(0.96, abs=1e-3)
    assert near_duplicates(samples[:2], [[0, 1]], vectors[:2], threshold=0.95) == []  # copies alone: exact only
    exact = [{"files": group["files"][:2]}]
    assert [leak["kind"] for leak in leakage(exact, [group])] == ["near"]  # the copy inside is not counted twice


def test_class_balance_flags_ratio_and_empty_classes():
    samples = [Sample(f"/{i}", "big" if i < 8 else "small", "train") for i in range(10)]
    flagged = class_balance(samples, ["big", "small"], max_ratio=3.0)
    assert (flagged["counts"], flagged["ratio"], flagged["flagged"]) == ({"big": 8, "small": 2}, 4.0, True)
    assert not class_balance(samples, ["big", "small"], max_ratio=5.0)["flagged"]
    empty = class_balance(samples, ["big", "empty", "small"], max_ratio=5.0)
    assert empty["ratio"] is None and empty["flagged"]


def tiny_cli_args(tiny_weights: str) -> list[str]:
    return ["--backbone", "test_efficientnet", "--weights", tiny_weights, "--image-size", "32", "--workers", "0"]


def test_json_output_and_report_file(squares, tiny_weights, tmp_path, capsys):
    _, planted, moved = squares
    out = tmp_path / "report.json"
    assert run_cli(["doctor", str(planted), *tiny_cli_args(tiny_weights), "--json", "--out", str(out), "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    assert set(report) >= {"data", "layout", "images", "classes", "backbone", "settings", "skipped",
                           "exact_duplicates", "near_duplicates", "leakage", "class_balance", "tiny_images",
                           "mislabeled", "notes", "summary"}
    assert report["images"] == 36 and report["classes"] == ["class_0", "class_1", "class_2"]
    assert report["summary"]["mislabeled"] == len(report["mislabeled"]) >= 1
    assert set(report["mislabeled"][0]) == {"path", "split", "label", "suggested", "probability",
                                            "label_probability", "margin"}
    assert report["mislabeled"][0]["path"] == moved


def test_text_summary_lists_findings_with_files(squares, tiny_weights, capsys):
    _, planted, _ = squares
    assert run_cli(["doctor", str(planted), *tiny_cli_args(tiny_weights), "--near-threshold", "0.999", "-q"]) == 0
    text = capsys.readouterr().out
    assert "review possibly mislabeled: 1 image" in text and "ok     exact duplicates: none" in text
    assert "class_1/from_class_0.png: labelled class_1" in text and "looks like class_0" in text
    assert "exact duplicates: none" in text


def test_one_class_skips_the_mislabel_check_with_a_note(tmp_path, tiny_weights, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "only").mkdir()
    for i in range(3):
        make_image(0, rng).save(tmp_path / "only" / f"{i}.png")
    assert run_cli(["doctor", str(tmp_path), *tiny_cli_args(tiny_weights), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mislabeled"] == [] and any("mislabel check skipped" in note for note in report["notes"])
    # data `train` refuses is a finding, not "no problems found"
    assert report["class_balance"]["flagged"] and report["class_balance"]["problem"] == \
        "one class only: train needs at least 2"
    assert report["summary"]["findings"] >= 1


def test_a_class_of_one_image_is_a_finding(tmp_path, tiny_weights, capsys):
    data = make_class_folders(tmp_path / "data", classes=2, per_class=3)
    for extra in sorted((data / "class_1").iterdir())[1:]:
        extra.unlink()
    assert run_cli(["doctor", str(data), *tiny_cli_args(tiny_weights), "-q"]) == 0
    assert "fix    class balance: largest/smallest 3: class_0 3, class_1 1; train needs at least 2 images " \
           "per class (class_1 has 1)" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "empty", "bad-threshold", "bad-pool", "out-is-folder"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, tiny_weights, capsys):
    data = make_class_folders(tmp_path / "data", classes=2, per_class=2)
    (tmp_path / "empty").mkdir()
    args = {"missing": [str(tmp_path / "nope")], "empty": [str(tmp_path / "empty")],
            "bad-threshold": [str(data), "--near-threshold", "1.5"], "bad-pool": [str(data), "--pool", "median"],
            "out-is-folder": [str(data), "--out", str(tmp_path)]}
    assert run_cli(["doctor", *args[case], *tiny_cli_args(tiny_weights), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("transferkit: error:") and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("pool", [None, "avg"])
def test_train_after_doctor_reuses_its_features(binary_dataset, tiny_options, fast, tmp_path, pool):
    """Doctor embeds as train pools (decision 0302): by default max, or as --pool says, so train after doctor finds
    every image's features in the cache."""
    cache = tmp_path / "cache"
    chosen = {} if pool is None else {"pool": pool}
    report = diagnose(binary_dataset, DoctorOptions(**tiny_options, **chosen, cache_dir=str(cache)))
    assert report["backbone"]["pool"] == (pool or "max")
    shards = sorted(cache.glob("features/*/*.npy"))
    assert shards
    api.train(binary_dataset, tmp_path / "run", **{**fast, "epochs_finetune": 0, **chosen}, cache_dir=str(cache))
    assert sorted(cache.glob("features/*/*.npy")) == shards  # nothing new went through the backbone


def test_hidden_files_and_system_folders_are_a_note_not_a_finding(tmp_path, tiny_options):
    """A Mac's .DS_Store and an unzipped archive's __MACOSX are left out by design; a broken file is a finding."""
    data = make_class_folders(tmp_path / "data", classes=2, per_class=6)
    (data / "class_0" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (data / "__MACOSX").mkdir()
    (data / "class_1" / "broken.jpg").write_bytes(b"not a jpeg")
    report = diagnose(data, DoctorOptions(**tiny_options))
    assert [Path(s["path"]).name for s in report["skipped"]] == ["broken.jpg"]
    assert report["summary"]["skipped"] == 1
    assert "2 hidden files or system folders (.DS_Store, __MACOSX, …) left out, as train leaves them out" in \
        report["notes"]
