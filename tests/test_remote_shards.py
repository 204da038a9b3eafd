"""Packed datasets at a URL: train reads `http://host/shards/` (a local HTTP server) and `s3://bucket/shards/` (moto's
S3 server) through fsspec and ends as the same run on the local folder; a URL without a pack, or without the `cloud`
extra, is one line and exit 2."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from transferkit.cli.main import run_cli
from transferkit.data.shards import pack
from transferkit.progress import Reporter
from transferkit.runs.run import Run


class RangeHandler(SimpleHTTPRequestHandler):
    """Python's file server plus single byte ranges (`Range: bytes=a-b`), as S3, GCS and nginx serve them."""

    def send_head(self):  # noqa: ANN201 - http.server's signature
        spec = self.headers.get("Range")
        if not spec or self.command != "GET":
            return super().send_head()
        try:
            with open(self.translate_path(self.path), "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                first, last = spec.removeprefix("bytes=").split("-")
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
                handle.seek(start)
                body = handle.read(end - start + 1)
        except OSError:
            self.send_error(404)
            return None
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(dataset: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(URL of the packed dataset, its local folder), served by a local HTTP server in a thread."""
    root = tmp_path / "www"
    pack(dataset, root / "shards", shard_size_bytes=4000, reporter=Reporter(quiet=True))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/shards/", root / "shards"
    finally:
        server.shutdown()
        server.server_close()


def command(*args: str) -> subprocess.CompletedProcess:
    """A command in its own process, as a user runs it: fsspec's event-loop threads and remote reads with forked
    loader workers stay out of the test process, where later forks crashed it (decision 0164's crashes)."""
    return subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True, timeout=600)


def transferkit(*args: str) -> str:
    done = command(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def train(data: str, out: Path, weights: str) -> dict:
    """`transferkit train` on one epoch of each stage, in its own process; its metrics.json."""
    transferkit("train", data, "--out", str(out), "--backbone", "test_efficientnet", "--weights", weights,
                "--image-size", "32", "--batch-size", "8", "--workers", "2", "--epochs-frozen", "1",
                "--epochs-finetune", "1", "--unfreeze", "all", "--augment", "none", "--cache-dir",
                str(out.parent / f"cache-{out.name}"), "--quiet")
    return json.loads((out / "metrics.json").read_text())


def test_train_on_shards_at_a_url_matches_the_local_folder(served: tuple[str, Path], tmp_path: Path,
                                                          fast: dict) -> None:
    url, local = served
    local_metrics = train(str(local), tmp_path / "local", fast["weights"])
    metrics = train(url, tmp_path / "remote", fast["weights"])
    assert metrics["loss"] == pytest.approx(local_metrics["loss"], abs=1e-5)
    assert metrics["accuracy"] == local_metrics["accuracy"]
    here = Run(tmp_path / "local")
    split = json.loads((tmp_path / "remote" / "split.json").read_text())
    remote_paths = [path for paths in split.values() if isinstance(paths, list) for path in paths]
    assert remote_paths and all(str(path).startswith(url) for path in remote_paths)
    # evaluate and predict take the URL too, and see the same images as the local folder
    shutil.copytree(tmp_path / "local", tmp_path / "copy")  # evaluate writes its metrics into the run
    evaluated = json.loads(transferkit("evaluate", str(tmp_path / "copy"), url, "--json"))
    assert evaluated["n"] == 36 and 0 <= evaluated["accuracy"] <= 1  # data at another address: scored whole
    # ... and its copies of the run's training images are found by their digests in the pack's index
    trained_on = len(json.loads((tmp_path / "local" / "split.json").read_text())["train"])
    assert evaluated["leaked_from_train"]["count"] == trained_on
    remote_predictions = json.loads(transferkit("predict", str(here.path), url, "--engine", "torch", "--json"))
    local_predictions, _ = here.predict([str(local)])
    assert len(remote_predictions) == len(local_predictions) == 36
    assert [p["probability"] for p in remote_predictions] == pytest.approx(
        [p["probability"] for p in local_predictions], abs=1e-6)


def test_url_without_a_pack_is_one_line_and_exit_2(served: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = served
    done = command("train", url.replace("/shards/", "/nothing/"), "--out", str(tmp_path / "run"), "-q")
    assert done.returncode == 2
    err = done.stderr.strip()
    assert err.startswith("transferkit: error:") and "\n" not in err and "no packed dataset at" in err


def test_missing_backend_names_the_extra(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                         tmp_path: Path) -> None:
    import fsspec.core

    def no_backend(url: str, **kwargs: object) -> None:
        raise ImportError("HTTPFileSystem requires 'requests' and 'aiohttp' to be installed")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_backend)
    assert run_cli(["train", "http://127.0.0.1:9/shards/", "--out", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'transferkit[cloud]'" in err


def test_doctor_on_shards_at_a_url_reports_what_it_reports_locally(served: tuple[str, Path], tiny_weights: str,
                                                                   tmp_path: Path) -> None:
    from transferkit.doctor import DoctorOptions, diagnose

    url, local = served
    remote = json.loads(transferkit("doctor", url, "--backbone", "test_efficientnet", "--weights", tiny_weights,
                                    "--image-size", "32", "--workers", "0", "--cache-dir", str(tmp_path / "cache"),
                                    "--json"))
    here = diagnose(local, DoctorOptions(backbone="test_efficientnet", weights=tiny_weights, image_size=32,
                                         workers=0, quiet=True, cache_dir=str(tmp_path / "cache")))
    assert remote["images"] == here["images"] == 36 and remote["layout"] == "shards"
    assert remote["summary"] == here["summary"]
    assert [s["margin"] for s in remote["mislabeled"]] == [s["margin"] for s in here["mislabeled"]]


@pytest.fixture
def bucket(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(s3:// URL of the packed dataset, its local folder) on moto's S3 server; credentials and endpoint come from
    the environment, as a user's would."""
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    pack(dataset, tmp_path / "shards", shard_size_bytes=4000, reporter=Reporter(quiet=True))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(name, value)
    S3FileSystem.clear_instance_cache()
    # uploaded from another process: s3fs's event-loop thread must not live on in this one (forks follow)
    upload = ("import s3fs, sys; fs = s3fs.S3FileSystem(skip_instance_cache=True); fs.mkdir('data'); "
              "fs.put(sys.argv[1] + '/', 'data/shards/', recursive=True)")
    try:
        subprocess.run([sys.executable, "-c", upload, str(tmp_path / "shards")], check=True, timeout=300)
        yield "s3://data/shards/", tmp_path / "shards"
    finally:
        S3FileSystem.clear_instance_cache()
        server.stop()


def test_train_on_shards_in_a_bucket_matches_the_local_folder(bucket: tuple[str, Path], tmp_path: Path,
                                                             fast: dict) -> None:
    url, local = bucket
    here = train(str(local), tmp_path / "local", fast["weights"])
    there = train(url, tmp_path / "remote", fast["weights"])
    assert there["loss"] == pytest.approx(here["loss"], abs=1e-5)
    assert there["accuracy"] == here["accuracy"]
    assert json.loads((tmp_path / "remote" / "split.json").read_text())["train"][0].startswith(url)


def test_unreachable_bucket_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                        "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    done = command("train", "s3://data/shards/", "--out", str(tmp_path / "run"), "-q")
    assert done.returncode == 2
    err = done.stderr.strip()
    assert err.startswith("transferkit: error: cannot read s3://data/shards/index.json") and "\n" not in err
