"""report.html and predictions.csv: what the page shows agrees with the run folder's files, it renders in Debian's
chromium from disk without touching a network, names are escaped, and missing pieces become lines, not errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_class_folders, make_image
from tests.test_serve import CHROMIUM, CHROMIUM_ARGS
from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.report import write_report
from transferkit.runs.files import read_history, read_predictions
from transferkit.runs.run import Run

# Markup and quotes in class and file names: the page must show them as text, never run or parse them.
NASTY_CLASSES = ["<i onmouseover=alert(1)>x", "a&b \"c\" 'd'"]
NASTY_IMAGE = "<img src=x onerror=alert({i})> {i}.png"
BROKEN_FILE = 'broken <b>&"q".png'


def nasty_dataset(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for c, name in enumerate(NASTY_CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(14):
            make_image(c, rng).save(root / name / (NASTY_IMAGE.format(i=i) if c == 0 else f"img_{i:03d}.png"))
    (root / NASTY_CLASSES[1] / BROKEN_FILE).write_bytes(b"not an image")
    return root


def train_tiny(data: Path, out: Path, weights: str, **options) -> Run:
    """conftest's `fast` options with a high head learning rate, so the model tells the classes apart. Seconds."""
    return api.train(data, out, backbone="test_efficientnet", weights=weights, image_size=32, batch_size=8, workers=0,
                     epochs_frozen=8, head_fit="sgd", epochs_finetune=1, lr=0.03, patience=0, augment="none",
                     quiet=True, **options)


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str) -> Run:
    root = tmp_path_factory.mktemp("report3")
    return train_tiny(make_class_folders(root / "data"), root / "run", tiny_weights, test_split=0.25)


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str) -> Run:
    root = tmp_path_factory.mktemp("report2")
    return train_tiny(nasty_dataset(root / "data"), root / "run", tiny_weights)


@pytest.fixture(params=["binary", "three classes"])
def any_run(request: pytest.FixtureRequest) -> Run:
    return request.getfixturevalue("binary_run" if request.param == "binary" else "three_class_run")


def copy_run(run: Run, target: Path) -> Path:
    """A copy to change or break, leaving the module's runs as trained."""
    return Path(shutil.copytree(run.path, target))


def page_of(folder: Path) -> str:
    return (folder / "report.html").read_text()


def test_predictions_csv_is_the_evaluated_split_and_agrees_with_metrics(any_run: Run) -> None:
    metrics = json.loads((any_run.path / "metrics.json").read_text())
    paths, y_true, probs = read_predictions(any_run.path / "predictions.csv", any_run.classes)
    split = json.loads((any_run.path / "split.json").read_text())
    assert paths == split[metrics["split"]] and len(paths) == metrics["n"]
    assert [any_run.classes[y] for y in y_true] == split["labels"][metrics["split"]]
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    confusion = np.zeros((len(any_run.classes),) * 2, dtype=int)
    np.add.at(confusion, (y_true, probs.argmax(axis=1)), 1)
    assert confusion.tolist() == metrics["confusion_matrix"]
    assert np.allclose(probs, any_run.probabilities(paths), atol=1e-5)


def test_binary_report_has_a_roc_curve_and_three_classes_have_none(binary_run: Run, three_class_run: Run) -> None:
    binary, multi = page_of(binary_run.path), page_of(three_class_run.path)
    assert '<section id="roc">' in binary and "positive class: <b>a&amp;b" in binary
    assert '<section id="roc">' not in multi and 'href="#roc"' not in multi
    for section in ("dataset", "training", "metrics", "confusion", "gallery", "top-losses", "similarity", "model"):
        assert f'<section id="{section}">' in binary and f'<section id="{section}">' in multi
    assert 'class="missing"' not in multi  # a complete run lacks nothing


def test_the_report_only_runs_the_model_on_a_few_images(three_class_run: Run, monkeypatch) -> None:
    def no_inference_over_the_split(*args, **kwargs):
        raise AssertionError("the report re-ran inference instead of reading predictions.csv")

    monkeypatch.setattr(Run, "probabilities", no_inference_over_the_split)
    write_report(three_class_run)


def visible_report(path: Path, problems: list[str], requests: list[str]):
    """Open the page from disk in chromium, recording console errors, page errors, dialogs and every request."""
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(path.as_uri(), wait_until="load")
    return playwright, browser, page


@pytest.mark.browser
def test_page_renders_in_chromium_from_disk_without_a_network(any_run: Run) -> None:
    # A skip would hide a broken page: CI installs chromium (.ci/run), so a missing browser is a failure.
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    problems: list[str] = []
    requests: list[str] = []
    playwright, browser, page = visible_report(any_run.path / "report.html", problems, requests)
    try:
        images = page.locator("img")
        assert images.count() >= 8
        widths = images.evaluate_all("imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        assert all(width > 0 for width in widths), widths
        assert page.locator("script").count() == 0
        sections = page.locator("section h2").all_inner_texts()
        assert ("ROC curve" in sections) == (len(any_run.classes) == 2)
        per_class = page.locator("table.per-class tbody td:first-child").all_inner_texts()
        assert per_class == any_run.classes
        pixels = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")).astype(np.int32)
        colours = np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2])  # one int per colour
        assert pixels.std() > 10 and len(colours) > 50
    finally:
        browser.close()
        playwright.stop()
    assert not problems, problems
    assert [url for url in requests if not url.startswith(("file://", "data:"))] == []


def test_numbers_on_the_page_are_the_run_folders(three_class_run: Run) -> None:
    page = page_of(three_class_run.path)
    metrics = json.loads((three_class_run.path / "metrics.json").read_text())
    assert f"<tr><th>accuracy</th><td>{metrics['accuracy']:.4f}</td></tr>" in page
    assert f"<tr><th>split</th><td>{metrics['split']}</td></tr>" in page and metrics["split"] == "test"
    history = read_history(three_class_run.path / "history.csv")
    assert page.count("<td>frozen</td>") == sum(h["stage"] == "frozen" for h in history) == 8
    assert page.count("<td>finetune</td>") == 1
    assert page.count('<tr class="kept-row">') == page.count("★ kept") == 1
    split = json.loads((three_class_run.path / "split.json").read_text())
    assert f"<tr><td>all classes</td><td>{len(split['train'])}</td><td>{len(split['val'])}</td>" in page
    _, y_true, probs = read_predictions(three_class_run.path / "predictions.csv", three_class_run.classes)
    wrong, correct = int((probs.argmax(1) != y_true).sum()), int((probs.argmax(1) == y_true).sum())
    gallery = page.split('<section id="gallery">')[1].split("</section>")[0]
    assert gallery.count('class="card right"') == min(6, correct)
    assert gallery.count('class="card wrong"') == min(6, wrong)
    losses = page.split('<section id="top-losses">')[1].split("</section>")[0]
    assert losses.count('class="card wrong"') == min(12, wrong) and f"{wrong} wrong prediction(s)" in losses


def test_class_and_file_names_are_escaped(binary_run: Run) -> None:
    page = page_of(binary_run.path)
    assert "<i onmouseover" not in page and "&lt;i onmouseover=alert(1)&gt;x" in page
    assert "a&b" not in page and "a&amp;b &#34;c&#34; &#39;d&#39;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(" in page
    assert "broken <b>" not in page and "broken &lt;b&gt;&amp;&#34;q&#34;.png" in page
    problems: list[str] = []
    playwright, browser, page_view = visible_report(binary_run.path / "report.html", problems, [])
    try:
        skipped = page_view.locator("table.skipped tbody td:first-child").all_inner_texts()
        assert [Path(s).name for s in skipped] == [BROKEN_FILE]
        assert page_view.locator("i, [onerror], [onmouseover]").count() == 0
        assert page_view.locator("table.skipped td").evaluate_all("tds => tds.every(td => !td.children.length)")
        alts = page_view.locator("#similarity .thumbs img").evaluate_all("imgs => imgs.map(i => i.alt)")
        assert any(alt.startswith("<img src=x onerror=alert(") for alt in alts), alts
    finally:
        browser.close()
        playwright.stop()
    assert not problems, problems


def test_missing_files_become_lines_and_report_data_brings_them_back(three_class_run: Run, tmp_path: Path,
                                                                     capsys) -> None:
    folder = copy_run(three_class_run, tmp_path / "run")
    for name in ("history.csv", "predictions.csv", "metrics.json", "report.html"):
        (folder / name).unlink()
    assert run_cli(["report", str(folder)]) == 0
    page = page_of(folder)
    assert "no training history" in page and "no metrics.json" in page
    assert page.count("no predictions.csv") == 4  # calibration, gallery, top losses, similarity
    assert "reasons are recorded in metrics.json" in page
    assert 'class="card' not in page
    data = three_class_run.path.parent / "data"
    assert run_cli(["report", str(folder), "--data", str(data)]) == 0
    assert "test accuracy" in capsys.readouterr().err
    page = page_of(folder)
    assert "no predictions.csv" not in page and "no metrics.json" not in page and 'class="card' in page


def test_images_gone_since_evaluation_are_reported(three_class_run: Run, tmp_path: Path) -> None:
    folder = copy_run(three_class_run, tmp_path / "run")
    predictions = folder / "predictions.csv"
    data = str(three_class_run.path.parent / "data")
    predictions.write_text(predictions.read_text().replace(data, str(tmp_path / "gone")))
    write_report(Run(folder))
    page = page_of(folder)
    assert "could not be read from here" in page
    assert "fewer than two of the evaluated images can be read from here" in page


def test_evaluate_rewrites_the_report(three_class_run: Run, tmp_path: Path) -> None:
    folder = copy_run(three_class_run, tmp_path / "run")
    (folder / "report.html").unlink()
    data = three_class_run.path.parent / "data"
    assert run_cli(["evaluate", str(folder), str(data), "--split", "all"]) == 0
    page = page_of(folder)
    assert "<tr><th>split</th><td>all</td></tr>" in page and "<tr><th>images (n)</th><td>36</td></tr>" in page
    assert len(read_predictions(folder / "predictions.csv", three_class_run.classes)[0]) == 36


def test_report_on_a_folder_that_is_not_a_run_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    assert run_cli(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a complete run folder" in err[0]
    assert not (tmp_path / "report.html").exists()

