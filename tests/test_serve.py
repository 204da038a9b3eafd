"""`transferkit serve`: a real uvicorn server on a free loopback port, driven over HTTP and from a real browser.

Happy paths agree with `Run.predict` (multi-label runs: test_serve_multilabel); every bad upload gets its 4xx
JSON error and the server keeps serving; concurrent requests are batched; the web page works from the keyboard in
Debian's chromium.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from tests.conftest import make_class_folders
from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.data.images import load_rgb, register_heif
from transferkit.export.check import pixel_transform
from transferkit.runs.run import Run
from transferkit.serve import Limits, create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
# Small limits, so each refusal is provoked with a few hundred KB.
LIMITS = Limits(max_file_bytes=100_000, max_files=4, max_request_bytes=1_000_000, max_pixels=250_000)


@contextmanager
def serving(app) -> Iterator[str]:
    """A real uvicorn server in a thread on a free loopback port (the kernel picks it); stopped on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str) -> Run:
    """One tiny run for the whole module, trained until it tells the classes apart (so agreeing with Run.predict
    means something): conftest's `fast` options, a head-only stage with a high learning rate. Seconds."""
    root = tmp_path_factory.mktemp("serve")
    data = make_class_folders(root / "data")
    return api.train(data, root / "run", backbone="test_efficientnet", weights=tiny_weights, image_size=32,
                     batch_size=8, workers=0, epochs_frozen=15, epochs_finetune=0, lr=0.03, patience=0,
                     augment="none", quiet=True)


@pytest.fixture(scope="module")
def images(tiny_run: Run) -> list[Path]:
    """One image of each class, then more: the files every happy path uploads."""
    data = tiny_run.path.parent / "data"
    return [data / f"class_{i % 3}" / f"img_{i:03d}.png" for i in range(6)]


@pytest.fixture(scope="module")
def base(tiny_run: Run) -> Iterator[str]:
    # A long batching window makes "concurrent requests share a batch" certain on a busy 2-core machine.
    with serving(create_app(tiny_run, limits=LIMITS, batch_wait_ms=25)) as url:
        yield url


def upload(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def assert_serves(base: str, image: Path) -> None:
    response = httpx.post(f"{base}/predict", files=upload(image))
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["filename"] == image.name


def test_health_model_and_docs(base: str, tiny_run: Run) -> None:
    assert httpx.get(f"{base}/health").json()["status"] == "ok"
    info = httpx.get(f"{base}/model").json()
    assert info["classes"] == tiny_run.classes == ["class_0", "class_1", "class_2"]
    assert (info["backbone"], info["image_size"], info["engine"]) == ("test_efficientnet", 32, "Run")
    assert info["metrics"] == json.loads((tiny_run.path / "metrics.json").read_text())
    assert info["limits"]["max_files"] == LIMITS.max_files
    schema = httpx.get(f"{base}/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    for docs in ("docs", "redoc"):
        page = httpx.get(f"{base}/{docs}")
        assert page.status_code == 200 and "https://" not in page.text  # offline: no asset from a CDN
        for asset in re.findall(r'(?:src|href)="(/[^"]+)"', page.text):
            assert httpx.get(f"{base}{asset}").status_code == 200, asset
    page = httpx.get(f"{base}/")
    assert page.status_code == 200 and 'type="file"' in page.text and "default-src 'self'" in page.headers[
        "content-security-policy"]


def test_predictions_equal_run_predict(base: str, tiny_run: Run, images: list[Path]) -> None:
    batch = images[:4]
    response = httpx.post(f"{base}/predict", params={"top_k": 2}, files=upload(*batch))
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    expected, skipped = tiny_run.predict([str(p) for p in batch], top_k=2)
    assert not skipped
    assert [p["filename"] for p in served] == [p.name for p in batch]
    assert [p["label"] for p in served] == [e["label"] for e in expected]
    assert len({p["label"] for p in served}) == 3  # a model that says one class for everything would agree trivially
    for got, want in zip(served, expected, strict=True):
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)
        assert [t["label"] for t in got["top"]] == [t["label"] for t in want["top"]] and len(got["top"]) == 2
        assert "gradcam_png" not in got


def test_gradcam_overlays_are_pngs_of_the_model_view(base: str, images: list[Path]) -> None:
    response = httpx.post(f"{base}/predict", params={"gradcam": "true"}, files=upload(*images[:2]))
    assert response.status_code == 200, response.text
    for prediction in response.json()["predictions"]:
        overlay = Image.open(io.BytesIO(base64.b64decode(prediction["gradcam_png"])))
        assert overlay.format == "PNG" and overlay.size == (32, 32) and overlay.mode == "RGB"


def _multipart(body: bytes) -> dict:
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=xyz"}}


def _files(name: str, data: bytes, content_type: str = "image/png") -> dict:
    return {"files": [("files", (name, data, content_type))]}


def _bomb() -> bytes:
    return png_bytes(Image.new("L", (1000, 1000)))  # 1 MP of black: a few KB on the wire, over the 0.25 MP limit


Request = Callable[[list[Path]], dict]
# name -> (httpx.post keyword arguments from the good images, expected status, a fragment of the error)
BAD_REQUESTS: dict[str, tuple[Request, int, str]] = {
    "empty body": (lambda ims: {"content": b""}, 400, "no files"),
    "multipart without files": (lambda ims: _multipart(b"--xyz--\r\n"), 400, "no files"),
    "another field name": (lambda ims: {"files": [("image", ("a.png", ims[0].read_bytes()))]}, 400, "'image'"),
    "json body": (lambda ims: {"json": {"image": "a.png"}}, 415, "multipart/form-data"),
    "text part": (lambda ims: _files("notes.txt", b"hello", "text/plain"), 415, "text/plain"),
    "not an image": (lambda ims: _files("fake.png", b"hello " * 50), 415, "fake.png: not an image"),
    "empty file": (lambda ims: _files("empty.png", b""), 400, "empty file"),
    "truncated image": (lambda ims: _files("cut.png", ims[0].read_bytes()[:300]), 400, "truncated"),
    "over the byte limit": (lambda ims: _files("big.png", os.urandom(150_000)), 413, "big.png: larger than"),
    "decompression bomb": (lambda ims: _files("bomb.png", _bomb()), 413, "too large"),
    "too many files": (lambda ims: {"files": upload(*ims[:5])}, 413, "too many files"),
    "request over the cap": (
        lambda ims: {"files": [("files", (f"{i}.png", os.urandom(90_000), "image/png")) for i in range(12)]},
        413,
        "request larger than",
    ),
    "malformed multipart": (lambda ims: _multipart(b"--xyz\r\nno end of headers"), 400, ""),
    "bad query": (lambda ims: {"params": {"top_k": 0}, "files": upload(ims[0])}, 422, "top_k"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_uploads_get_a_json_4xx_and_the_server_lives_on(base: str, images: list[Path], case: str) -> None:
    make_request, status, fragment = BAD_REQUESTS[case]
    response = httpx.post(f"{base}/predict", timeout=30, **make_request(images))
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and fragment in body["error"] and "Traceback" not in body["error"]
    assert_serves(base, images[1])


def test_unknown_paths_are_json_errors(base: str) -> None:
    assert httpx.get(f"{base}/nope").json() == {"error": "Not Found"}
    response = httpx.get(f"{base}/predict")
    assert response.status_code == 405 and "error" in response.json()


def test_concurrent_requests_are_batched_and_a_bad_upload_among_them_fails_alone(
    base: str, tiny_run: Run, images: list[Path]
) -> None:
    before = httpx.get(f"{base}/health").json()["batching"]
    expected = {e["path"]: e["label"] for e in tiny_run.predict([str(p) for p in images])[0]}
    start = threading.Barrier(16)
    truncated = images[0].read_bytes()[:300]  # decoded in the model thread, in a batch with the others

    def one(i: int) -> tuple[Path, httpx.Response]:
        path = images[i % len(images)]
        files = [("files", ("cut.png", truncated, "image/png"))] if i == 5 else upload(path)
        start.wait()  # all 16 leave together, so they arrive within one batching window
        return path, httpx.post(f"{base}/predict", files=files, timeout=60)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    for i, (path, response) in enumerate(answers):
        if i == 5:
            assert response.status_code == 400 and "cut.png: truncated" in response.json()["error"]
            continue
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == expected[str(path.resolve())]
    after = httpx.get(f"{base}/health").json()["batching"]
    assert after["images"] - before["images"] == 15
    assert after["batches"] - before["batches"] < 15 and after["largest"] > 1  # several requests per model call


def test_onnx_batch_pixels_equal_the_run_transform_bit_for_bit(tiny_run: Run, images: list[Path]) -> None:
    # The ONNX engine builds a server's batch in numpy; it must be exactly what evaluation and export checks use.
    decoded = [load_rgb(p) for p in images[:3]] + [Image.new("RGB", (61, 45), (9, 200, 77))]  # one needs a resize
    transform = pixel_transform(tiny_run.preprocess)
    expected = np.stack([transform(image).numpy() for image in decoded])
    assert np.array_equal(tiny_run.preprocess.pixels(decoded), expected)


class Wrapped:
    """An exported-style predictor: same methods as Run, no PyTorch model (like the ONNX one)."""

    def __init__(self, run: Run, fail_on_size: tuple[int, int] | None = None) -> None:
        self.classes, self.preprocess, self._run, self._fail_on_size = run.classes, run.preprocess, run, fail_on_size

    def probabilities_of_images(self, images: list[Image.Image]) -> np.ndarray:
        if any(image.size == self._fail_on_size for image in images):
            raise RuntimeError("secret internal detail")
        return self._run.probabilities_of_images(images)


def test_gradcam_loads_the_run_for_a_predictor_without_a_torch_model(tiny_run: Run, images: list[Path]) -> None:
    with serving(create_app(Wrapped(tiny_run), run_dir=tiny_run.path)) as url:
        response = httpx.post(f"{url}/predict?gradcam=1", files=upload(images[0]))
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["gradcam_png"]
        assert httpx.get(f"{url}/model").json()["engine"] == "Wrapped"


def test_internal_errors_are_json_500s_without_details(tiny_run: Run, images: list[Path]) -> None:
    with serving(create_app(Wrapped(tiny_run, fail_on_size=(13, 13)))) as url:
        odd = png_bytes(Image.new("RGB", (13, 13), (200, 10, 10)))
        response = httpx.post(f"{url}/predict", files=[("files", ("odd.png", odd, "image/png"))])
        assert response.status_code == 500
        assert response.json() == {"error": "internal server error"}
        assert_serves(url, images[0])


def test_cli_serve_starts_answers_and_stops_on_ctrl_c(tiny_run: Run, images: list[Path], capsys) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "transferkit", "serve", str(tiny_run.path), "--port", str(port), "--no-access-log"]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90  # importing torch on a busy machine is the slow part
        while True:
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read() if server.stdout else ""
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert_serves(url, images[0])
        # The port is taken now: a second server says so in one line, exit 2, before loading anything.
        assert run_cli(["serve", str(tiny_run.path), "--port", str(port)]) == 2
        assert "cannot listen" in capsys.readouterr().err
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert "Traceback" not in output


def test_cli_serve_refuses_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert run_cli(["serve", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a complete run folder" in err[0]


@pytest.mark.browser
def test_page_in_chromium_matches_the_cli(base: str, tiny_run: Run, images: list[Path], capsys) -> None:
    # A skip would hide a broken page: CI installs chromium (.ci/run), so a missing browser is a failure.
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    from playwright.sync_api import expect, sync_playwright

    image = images[1]
    assert run_cli(["predict", str(tiny_run.path), str(image), "--json"]) == 0
    cli_label = json.loads(capsys.readouterr().out)[0]["label"]
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            # Intercepting file choosers is switched on asynchronously when the first listener is added: one added
            # inside expect_file_chooser() can lose the race with the key press, and the chooser opens unseen.
            page.on("filechooser", lambda _chooser: None)
            page.goto(base)
            expect(page.locator("#model-info")).to_contain_text("class_0, class_1, class_2")
            # Keyboard only: Tab reaches the real file input inside the drop zone, which shows the focus ring;
            # Enter opens its picker.
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.id") == "files"
            assert page.evaluate("getComputedStyle(document.getElementById('drop')).outlineStyle") == "solid"
            with page.expect_file_chooser() as chooser:
                page.keyboard.press("Enter")
            assert chooser.value.is_multiple()
            chooser.value.set_files(str(image))
            card = page.locator(".card").first
            expect(card.locator(".prediction .label")).to_have_text(cli_label)
            expect(card.locator(".bars li")).to_have_count(3)
            expect(card.locator("img.gradcam")).to_have_count(1)
            assert card.locator("img.gradcam").evaluate("img => img.complete && img.naturalWidth") == 32
            # Space works too.
            page.locator("#files").focus()
            with page.expect_file_chooser() as chooser:
                page.keyboard.press(" ")
            chooser.value.set_files([str(images[0]), str(images[2])])
            expect(page.locator(".card .prediction .label")).to_have_count(3)
            assert not problems, problems
            screenshot = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB"))
            assert screenshot.std() > 10 and len(np.unique(screenshot.reshape(-1, 3), axis=0)) > 50
            # A dropped file that is not an image fails its own card with the server's reason.
            dropped = page.evaluate_handle(
                "() => { const d = new DataTransfer(); "
                "d.items.add(new File(['not an image'], 'notes.png', {type: 'image/png'})); return d; }"
            )
            page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
            expect(page.locator(".card.failed .error")).to_have_text("notes.png: not an image")
            # An iPhone's HEIC: classified by the server, which reads it; Chromium cannot show it, so its card says so
            heic = images[0].with_name("phone.heic")
            register_heif()
            Image.open(images[0]).convert("RGB").save(heic)
            page.locator("#files").set_input_files(str(heic))
            card = page.locator(".card", has_text="phone.heic")
            expect(card.locator(".prediction .label")).to_have_count(1)
            expect(card.locator(".no-preview")).to_have_text("No preview: this browser cannot show phone.heic")
            assert card.locator("img.photo").count() == 0

            offsite: list[str] = []
            page.on("request", lambda r: offsite.append(r.url) if not r.url.startswith(base) else None)
            page.goto(f"{base}/docs")  # Swagger UI rendered from this server's own assets
            expect(page.locator(".opblock-summary-path", has_text="/predict")).to_be_visible()
            assert offsite == []
        finally:
            browser.close()


def test_a_large_jpeg_is_decoded_as_small_as_predict_decodes_it(base: str, tiny_run: Run, tmp_path: Path) -> None:
    """Both decode at libjpeg's reduced scale for the run's input size (decision 0295): the same probabilities."""
    photo = tmp_path / "photo.jpg"  # 8x the run's input: decoded at a quarter of its size, under the upload limit
    coarse = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((320, 240), Image.BICUBIC).save(photo, quality=90)
    response = httpx.post(f"{base}/predict", files=[("files", (photo.name, photo.read_bytes(), "image/jpeg"))])
    assert response.status_code == 200, response.text
    expected, _ = tiny_run.predict([str(photo)])
    served = response.json()["predictions"][0]
    assert served["label"] == expected[0]["label"]
    assert served["probability"] == pytest.approx(expected[0]["probability"], abs=1e-6)
    full = tiny_run.probabilities_of_images([Image.open(photo).convert("RGB")])  # decoded in full: other pixels
    assert abs(float(full.max()) - expected[0]["probability"]) > 1e-5
