"""`transferkit fetch` against a real HTTP server on a free loopback port.

The server plays every kind of source a URL list meets: good JPEG/PNG images, a 404, a 500 that recovers, a
server too slow to answer and one that trickles bytes forever, HTML posing as a JPEG, bodies over the size cap
(with and without Content-Length), a redirect loop, a good redirect, the same image under two URLs. Short
timeouts keep the whole file to a few seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image

from tests.conftest import make_image
from tests.test_cli import fails_with
from transferkit.cli.main import run_cli
from transferkit.data.content import file_digest
from transferkit.data.images import load_rgb
from transferkit.data.sources import scan_dataset
from transferkit.fetch import REPORT_NAME, STATE_NAME
from transferkit.fetch.download import MB
from transferkit.fetch.rows import MAX_NAME_BYTES, safe_name
from transferkit.fetch.store import image_extension

# Fast bounds: reads time out after 1 s, one retry after 0.5 s, 4 s per URL in all, bodies up to 50 KB.
FAST = ["--workers", "8", "--timeout", "1", "--retries", "1", "--max-time", "4", "--max-mb", "0.05"]


def encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


def picture(seed: int, image_format: str = "PNG") -> bytes:
    """A distinct small image per seed (distinct bytes, so none is a duplicate of another)."""
    return encode(make_image(seed % 6, np.random.default_rng(seed)), image_format)


CAT = picture(0, "JPEG")
DOG = picture(1, "PNG")
BIRD_JPEG = picture(2, "JPEG")  # served as /bird.png: stored with the real format's extension
FISH = picture(3)
FROG = picture(4)
HTML = b"<!doctype html><html><body>Access denied</body></html>"
# A 100-megapixel image that compresses to ~12 KB: refused from its header, never decoded.
BOMB = encode(Image.new("1", (10_000, 10_000)), "PNG")


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", content_type: str = "image/png",
         **headers: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def static(body: bytes, content_type: str = "image/png") -> Callable:
    return lambda handler: send(handler, 200, body, content_type)


def flaky(handler: BaseHTTPRequestHandler) -> None:
    """500 on the first request, the image afterwards."""
    first = handler.server.requests["/flaky"] == 1
    send(handler, 500, b"busy", "text/plain") if first else send(handler, 200, FROG)


def slow(handler: BaseHTTPRequestHandler) -> None:
    handler.server.stopping.wait(3.0)  # answers after 3 s: both attempts time out (2.5 s with the backoff)
    send(handler, 200, DOG)


def trickle(handler: BaseHTTPRequestHandler) -> None:
    """Headers at once, then one byte every 0.2 s for ever: no read ever times out."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.end_headers()
    while not handler.server.stopping.wait(0.2):
        handler.wfile.write(b"x")
        handler.wfile.flush()


def endless(handler: BaseHTTPRequestHandler) -> None:
    """A body with no Content-Length that does not end (until 100 MB, or the client leaves)."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.end_headers()
    for _ in range(6400):
        if handler.server.stopping.is_set():
            return
        handler.wfile.write(bytes(16_384))
        handler.server.endless_sent += 16_384


def redirect(target: str) -> Callable:
    return lambda handler: send(handler, 302, b"", "text/plain", Location=target)


ROUTES: dict[str, Callable] = {
    "/cat.jpg": static(CAT, "image/jpeg"),
    "/cat-mirror.jpg": static(CAT, "image/jpeg"),
    "/dog.png": static(DOG),
    "/bird.png": static(BIRD_JPEG),
    "/fish": redirect("/images/fish.png"),
    "/images/fish.png": static(FISH),
    "/flaky": flaky,
    "/missing.jpg": lambda handler: send(handler, 404, b"not found", "text/plain"),
    "/always-500": lambda handler: send(handler, 500, b"down", "text/plain"),
    "/fake.jpg": static(HTML, "image/jpeg"),
    "/truncated.jpg": static(CAT[: len(CAT) // 2], "image/jpeg"),
    "/bomb.png": static(BOMB),
    "/huge.png": static(bytes(200_000)),
    "/endless.png": endless,
    "/loop": redirect("/loop"),
    "/slow.png": slow,
    "/trickle.jpg": trickle,
    **{f"/img/{seed}.png": static(picture(seed)) for seed in range(10, 20)},
}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        with self.server.lock:
            self.server.requests[self.path] += 1
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up, as it should have
            ROUTES.get(self.path, lambda h: send(h, 404))(self)

    def log_message(self, *args: object) -> None:
        pass


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a handler still trickling must not hold up the test's end

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.endless_sent = 0  # bytes /endless.png got out before the client hung up

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server() -> Iterator[ImageServer]:
    server = ImageServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.stopping.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def write_csv(path: Path, rows: list[tuple[str, ...]], header: str = "url,label") -> Path:
    lines = [header] + [",".join(f'"{cell}"' for cell in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def fetch(capsys, csv_path: Path, out: Path, *extra: str) -> tuple[int, dict]:
    """Run the command with --json: (exit code, the report printed on stdout)."""
    code = run_cli(["fetch", str(csv_path), "--out", str(out), *FAST, *extra, "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report == json.loads((out / REPORT_NAME).read_text()), "stdout and the report file differ"
    return code, report


def stored_files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {REPORT_NAME, STATE_NAME}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def files_outside(root: Path, out: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and out not in p.parents}


def reasons_by_line(report: dict) -> dict[int, str]:
    return {failure["line"]: failure["reason"] for failure in report["failures"]}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the bomb is refused: no need to warn
def test_fetch_keeps_valid_images_and_reports_every_failure(capsys, server, tmp_path):
    rows = [
        ("/cat.jpg", "cat"),                 # line 2
        ("/dog.png", "dog"),                 # 3
        ("/cat-mirror.jpg", "cat"),          # 4: the same bytes as line 2
        ("/bird.png", "bird"),               # 5: a JPEG behind a .png URL
        ("/fish", "fish"),                   # 6: redirected to the image
        ("/flaky", "frog"),                  # 7: 500, then the image on the retry
        ("/missing.jpg", "cat"),             # 8
        ("/fake.jpg", "cat"),                # 9
        ("/truncated.jpg", "cat"),           # 10
        ("/bomb.png", "cat"),                # 11
        ("/huge.png", "cat"),                # 12: Content-Length over the cap
        ("/endless.png", "cat"),             # 13: no Content-Length, no end
        ("/loop", "cat"),                    # 14
        ("/slow.png", "cat"),                # 15
        ("/trickle.jpg", "cat"),             # 16
        ("/always-500", "cat"),              # 17
    ]
    csv_path = write_csv(tmp_path / "urls.csv", [(server.url(path), label) for path, label in rows]
                         + [("ftp://example.com/a.jpg", "cat"), (server.url("/dog.png"), "dog")])  # 18, 19
    out = tmp_path / "data"
    before = files_outside(tmp_path, out)

    code, report = fetch(capsys, csv_path, out)

    assert code == 0
    assert files_outside(tmp_path, out) == before
    assert stored_files(out) == {
        f"cat/{digest(CAT)}.jpeg", f"dog/{digest(DOG)}.png", f"bird/{digest(BIRD_JPEG)}.jpeg",
        f"fish/{digest(FISH)}.png", f"frog/{digest(FROG)}.png",
    }
    for name in stored_files(out):
        assert load_rgb(out / name).size == (40, 40)
        assert file_digest(out / name) == Path(name).stem
    assert report["counts"] == {"rows": 18, "stored": 5, "duplicates": 1, "failed": 12, "fetched": 16,
                                "from_earlier_runs": 0}
    [duplicate] = report["duplicates"]
    assert duplicate["line"] in (2, 4) and duplicate["duplicate_of"] == f"cat/{digest(CAT)}.jpeg"
    reasons = reasons_by_line(report)
    expected = {
        8: "HTTP 404 Not Found", 9: "not an image", 10: "truncated or corrupt", 11: "too large: 10000×10000",
        12: "too large: more than 0.05 MB", 13: "too large: more than 0.05 MB", 14: "redirect loop",
        15: "timed out (read, 1 s)", 16: "took longer than 4 s", 17: "HTTP 500", 18: "not an http(s) URL",
        19: "URL already listed on line 3",
    }
    assert set(reasons) == set(expected)
    for line, start in expected.items():
        assert reasons[line].startswith(start), (line, reasons[line])
    failure = next(f for f in report["failures"] if f["line"] == 8)
    assert failure == {"line": 8, "url": server.url("/missing.jpg"), "label": "cat", "reason": "HTTP 404 Not Found",
                       "permanent": True}
    assert server.requests["/flaky"] == 2 and server.requests["/always-500"] == 2  # one retry each
    assert server.requests["/missing.jpg"] == 1  # a 404 is not retried
    assert server.endless_sent < 25 * MB  # of 100: the client hung up at the cap (~4 MB sat in socket buffers)


def test_labels_become_safe_folders_inside_out(capsys, server, tmp_path):
    labels = ["../../etc", "/abs", "a/b", ".hidden", "..", "C:\\temp\\x", "tab\there", "évé", ""]
    csv_path = write_csv(tmp_path / "urls.csv",
                         [(server.url(f"/img/{10 + i}.png"), label) for i, label in enumerate(labels)])
    out = tmp_path / "deep" / "data"
    before = files_outside(tmp_path, out)

    code, report = fetch(capsys, csv_path, out)

    assert code == 0
    assert files_outside(tmp_path, out) == before
    folders = {Path(name).parent.as_posix() for name in stored_files(out)}
    assert folders == {"etc", "abs", "a_b", "hidden", "C__temp_x", "tabhere", "évé"}
    assert reasons_by_line(report) == {6: "label '..' has no usable characters for a folder name",
                                       10: "row without url or label"}


def test_safe_name_limits_length_without_splitting_characters():
    name = safe_name("é" * 200)
    assert name == "é" * (MAX_NAME_BYTES // 2)
    assert safe_name(" .. / . /\x00\u202e") == ""
    assert safe_name("cat. ") == "cat"


def test_split_column_gives_the_split_layout(capsys, server, tmp_path):
    rows = [("/img/10.png", "cat", "train"), ("/img/11.png", "cat", ""), ("/img/12.png", "cat", "Validation"),
            ("/img/13.png", "dog", "train"), ("/img/14.png", "dog", "train"), ("/img/15.png", "dog", "val"),
            ("/img/16.png", "dog", "../test"), ("/img/17.png", "cat", "test")]
    csv_path = write_csv(tmp_path / "urls.csv", [(server.url(u), label, split) for u, label, split in rows],
                         header="url,label,split")
    out = tmp_path / "data"

    code, report = fetch(capsys, csv_path, out)

    assert code == 0
    assert reasons_by_line(report) == {8: "unknown split '../test' (use train, val, valid, validation or test)"}
    assert Counter(Path(name).parent.as_posix() for name in stored_files(out)) == {
        "train/cat": 2, "val/cat": 1, "train/dog": 2, "val/dog": 1, "test/cat": 1}
    index = scan_dataset(out)  # what `transferkit train` reads
    assert Counter((s.split, s.label) for s in index.samples) == {
        ("train", "cat"): 2, ("val", "cat"): 1, ("train", "dog"): 2, ("val", "dog"): 1, ("test", "cat"): 1}


def test_rerun_resumes_and_retry_failed_retries(capsys, server, tmp_path):
    paths = ["/cat.jpg", "/dog.png", "/cat-mirror.jpg", "/missing.jpg", "/fake.jpg", "/always-500"]
    csv_path = write_csv(tmp_path / "urls.csv", [(server.url(p), "x") for p in paths])
    out = tmp_path / "data"
    _, first = fetch(capsys, csv_path, out, "--retries", "0")
    files = stored_files(out)
    assert first["counts"]["stored"] == 2 and first["counts"]["failed"] == 3
    assert all(server.requests[p] == 1 for p in paths)

    _, second = fetch(capsys, csv_path, out, "--retries", "0")
    # Only the transient failure is fetched again; stored, duplicate and permanently failed URLs are not.
    assert all(server.requests[p] == (2 if p == "/always-500" else 1) for p in paths)
    assert second["counts"] == {**first["counts"], "fetched": 1, "from_earlier_runs": 5}
    assert second["failures"] == first["failures"] and second["duplicates"] == first["duplicates"]
    assert stored_files(out) == files

    fetch(capsys, csv_path, out, "--retries", "0", "--retry-failed")
    assert all(server.requests[p] == {"/missing.jpg": 2, "/fake.jpg": 2, "/always-500": 3}.get(p, 1) for p in paths)

    (out / f"x/{digest(DOG)}.png").unlink()  # a stored image the user deleted is fetched again
    _, fourth = fetch(capsys, csv_path, out, "--retries", "0")
    assert server.requests["/dog.png"] == 2 and server.requests["/cat.jpg"] == 1
    assert stored_files(out) == files and fourth["counts"]["stored"] == 2


def test_unreadable_state_file_means_fetching_again(capsys, server, tmp_path):
    csv_path = write_csv(tmp_path / "urls.csv", [(server.url("/cat.jpg"), "cat")])
    out = tmp_path / "data"
    fetch(capsys, csv_path, out)
    (out / STATE_NAME).write_text("{not json")
    code = run_cli(["fetch", str(csv_path), "--out", str(out), *FAST])
    assert code == 0 and server.requests["/cat.jpg"] == 2
    assert "unreadable" in capsys.readouterr().err
    assert json.loads((out / STATE_NAME).read_text())["urls"][server.url("/cat.jpg")]["status"] == "stored"


def test_symlinked_label_folder_is_not_followed_outside(capsys, server, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = tmp_path / "data"
    out.mkdir()
    os.symlink(outside, out / "cat")
    csv_path = write_csv(tmp_path / "urls.csv", [(server.url("/cat.jpg"), "cat"), (server.url("/dog.png"), "dog")])

    code, report = fetch(capsys, csv_path, out)

    assert code == 0 and list(outside.iterdir()) == []
    assert reasons_by_line(report)[2].startswith(f"refused: cat/{digest(CAT)}.jpeg resolves outside --out")


def test_every_row_failing_exits_1_pointing_to_the_report(capsys, server, tmp_path):
    csv_path = write_csv(tmp_path / "urls.csv", [(server.url("/missing.jpg"), "cat"), (server.url("/fake.jpg"), "dog")])
    out = tmp_path / "data"
    code = run_cli(["fetch", str(csv_path), "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 1
    assert f"transferkit: error: every row failed; the reasons are in {out / REPORT_NAME}" in err.splitlines()
    assert json.loads((out / REPORT_NAME).read_text())["counts"]["failed"] == 2


def test_summary_lists_failures_on_stderr(capsys, server, tmp_path):
    csv_path = write_csv(tmp_path / "urls.csv", [(server.url("/cat.jpg"), "cat"), (server.url("/missing.jpg"), "x")])
    code = run_cli(["fetch", str(csv_path), "--out", str(tmp_path / "data"), *FAST])
    captured = capsys.readouterr()
    assert code == 0 and captured.out == ""
    assert "2 rows: 1 images stored, 0 duplicates, 1 failed" in captured.err
    assert f"line 3 {server.url('/missing.jpg')}: HTTP 404 Not Found" in captured.err


def test_bad_input_is_one_line_exit_2(capsys, tmp_path):
    out = str(tmp_path / "data")
    fails_with(capsys, ["fetch", str(tmp_path / "nope.csv"), "--out", out], "CSV not found", "nope.csv")
    (tmp_path / "paths.csv").write_text("path,label\na.jpg,cat\n")
    fails_with(capsys, ["fetch", str(tmp_path / "paths.csv"), "--out", out], "'url' and 'label' columns", "path")
    (tmp_path / "empty.csv").write_text("")
    fails_with(capsys, ["fetch", str(tmp_path / "empty.csv"), "--out", out], "is empty")
    (tmp_path / "header.csv").write_text("url,label\n")
    fails_with(capsys, ["fetch", str(tmp_path / "header.csv"), "--out", out], "no rows")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "ok.csv").write_text("url,label\nhttp://127.0.0.1:9/a.jpg,cat\n")
    fails_with(capsys, ["fetch", str(tmp_path / "ok.csv"), "--out", str(tmp_path / "a_file")], "is a file")
    fails_with(capsys, ["fetch", str(tmp_path / "ok.csv"), "--out", out, "--workers", "0"], "--workers")
    assert not (tmp_path / "data").exists()


def test_fetch_from_code_that_runs_an_event_loop(server, tmp_path):
    """A Jupyter cell runs inside an event loop, where asyncio.run refuses to start another."""
    import asyncio

    from transferkit.fetch.collect import fetch_dataset

    rows = [(server.url("/img/18.png"), "cat"), (server.url("/img/19.png"), "dog")]
    csv_path = write_csv(tmp_path / "urls.csv", rows)

    async def cell():
        return fetch_dataset(csv_path, tmp_path / "data")

    report = asyncio.run(cell())
    assert report["counts"]["stored"] == 2 and len(stored_files(tmp_path / "data")) == 2


def test_heic_and_avif_bodies_are_stored_as_images() -> None:
    """An iPhone's HEIC and an AVIF from the web are photos like any other, each stored under its format's name
    (decision 0296)."""
    image = make_image(0, np.random.default_rng(0), 64)
    heic, avif = io.BytesIO(), io.BytesIO()
    pillow_heif.from_pillow(image).save(heic, format="HEIF", quality=90)
    image.save(avif, format="AVIF", quality=90)
    assert (image_extension(heic.getvalue()), image_extension(avif.getvalue())) == (".heif", ".avif")
