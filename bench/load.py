"""Load test for `transferkit serve`: throughput and latency on loopback, bounded, stops by itself.

Starts the real CLI server in a subprocess on a free 127.0.0.1 port, then measures (1) single-image latency with one
client sending one request at a time, and (2) throughput with N concurrent clients sending one image per request,
for a fixed number of requests or a time cap, whichever comes first; once per engine (PyTorch, and ONNX Runtime on
the run's `transferkit export`, fp32 and int8), so the engines are compared in one run. With --repeats N the engines
take turns N times (a, b, c, a, b, c, ...) and the table gives each figure's median over the rounds, so load from
other processes hits all engines alike; errors are summed over the rounds. Errors are counted, never retried.
Without --run it trains a small Lite0 run first (offline weights, generated images: circles vs squares).

    .venv/bin/python bench/load.py     # Lite0 run in runs/bench-load; torch, ONNX, int8; 32 clients, 2000 requests
    .venv/bin/python bench/load.py --engines onnx,int8 --repeats 3
    .venv/bin/python bench/load.py --run runs/demo --engines onnx --clients 64 --requests 5000

The load generator shares the machine with the server (on 2 cores it takes a noticeable share): read the figures
as what one small box does end to end, not as the server's ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import process_tree  # noqa: E402 - bench/ is not a package

from transferkit import cpu  # noqa: E402


def make_images(folder: Path, per_class: int = 20, size: int = 256, seed: int = 0) -> list[Path]:
    """Two learnable classes of JPEGs (a bright circle or a bright square on noise), like photos on the wire."""
    rng = np.random.default_rng(seed)
    paths = []
    for shape in ("circle", "square"):
        (folder / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.fromarray((rng.random((size, size, 3)) * 120).astype(np.uint8))
            x, y = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
            r = int(rng.integers(30, 60))
            draw = ImageDraw.Draw(image)
            (draw.ellipse if shape == "circle" else draw.rectangle)((x - r, y - r, x + r, y + r), fill=(240, 230, 90))
            path = folder / shape / f"{i:03d}.jpg"
            image.save(path, quality=90)
            paths.append(path)
    return paths


def ensure_run(run: Path | None) -> tuple[Path, list[Path]]:
    """The run to serve and images to send: a given run with the generated images, or a fresh small Lite0 run."""
    out = run or Path("runs/bench-load")
    images = make_images(out.parent / f"{out.name}-images")
    if not (out / "meta.json").is_file():
        from transferkit import api

        print(f"training a Lite0 run in {out} (3 head epochs on {len(images)} images)...", flush=True)
        api.train(out.parent / f"{out.name}-images", out, epochs_frozen=3, epochs_finetune=0, quiet=True)
    return out, images


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.load(response)


def start_server(run: Path, engine: str, port: int, extra: list[str]) -> subprocess.Popen:
    argv = [sys.executable, "-m", "transferkit", "serve", str(run), "--port", str(port), "--engine", engine,
            "--no-access-log", *extra]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}:\n{server.stdout.read()}")
        try:
            get_json(port, "/health")
            return server
        except OSError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit("the server did not start within 180 s")


def request_bytes(port: int, name: str, data: bytes) -> bytes:
    """One complete HTTP/1.1 multipart upload, encoded once: the client's per-request work is then a socket write
    and a read (a full HTTP client library costs more CPU per request than the server does, on the same 2 cores)."""
    boundary = "transferkit-load-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class Connection:
    """A keep-alive connection that sends prepared requests and checks each answer (200, one prediction)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self, request: bytes) -> tuple[float, bool]:
        """(seconds, ok); a refused, broken or wrong answer is an error and the connection is reopened."""
        start = time.perf_counter()
        try:
            if self.streams is None:
                self.streams = await asyncio.open_connection("127.0.0.1", self.port)
            reader, writer = self.streams
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            body = await reader.readexactly(length)
            ok = head.startswith(b"HTTP/1.1 200") and len(json.loads(body)["predictions"]) == 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, AttributeError, ValueError, KeyError):
            self.close()
            ok = False
        return time.perf_counter() - start, ok

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def single(port: int, requests: list[bytes], count: int) -> list[float]:
    """One client, one request at a time: the latency a lone user sees (failed requests left out)."""
    connection = Connection(port)
    results = [await connection.send(requests[i % len(requests)]) for i in range(count)]
    connection.close()
    return [seconds for seconds, ok in results if ok]


async def load(port: int, requests: list[bytes], clients: int, count: int, max_s: float) -> dict:
    """`clients` concurrent connections, each sending one image per request, until `count` are sent or time is up."""
    latencies: list[float] = []
    errors = sent = 0
    stop_at = time.perf_counter() + max_s

    async def client_loop() -> None:
        nonlocal errors, sent
        connection = Connection(port)
        while sent < count and time.perf_counter() < stop_at:
            sent += 1
            seconds, ok = await connection.send(requests[sent % len(requests)])
            if ok:
                latencies.append(seconds)
            else:
                errors += 1
        connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    wall = time.perf_counter() - start
    return {"requests": sent, "ok": len(latencies), "errors": errors, "seconds": wall, "latencies": latencies}


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)} if len(ms) else {}


def ensure_export(run: Path, engine: str) -> None:
    """The onnx / int8 engines serve RUN/model.onnx / model.int8.onnx; make it (checked against PyTorch by
    `transferkit export`) if missing."""
    from transferkit.export.onnx import export_run
    from transferkit.predictor import EXPORT_FILES

    if not (run / EXPORT_FILES[engine]).is_file():
        print(f"exporting {run} to ONNX ({engine})...", flush=True)
        export_run(run, int8=engine == "int8")


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, all threads) of a process and its live child processes (`serve --workers N`)
    so far: unlike wall time, barely moved by other load."""
    if pid is None:
        return time.process_time()
    total = 0.0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def model_speed(run: Path, engine: str, images: list[Path], repeats: int = 5) -> dict:
    """The engine alone, in this process, on decoded images: the ceiling the server's figures are to be read against.
    Medians of `repeats`; it runs after the server has stopped, so the two never overlap."""
    from transferkit.data.images import load_rgb
    from transferkit.predictor import load_predictor

    predictor = load_predictor(run, engine)
    decoded = [load_rgb(path) for path in images[:32]]

    def timed(batch: list) -> tuple[float, float]:
        predictor.probabilities_of_images(batch)  # warm-up
        wall, cpu = [], []
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), cpu_seconds()
            predictor.probabilities_of_images(batch)
            wall.append(time.perf_counter() - start)
            cpu.append(cpu_seconds() - start_cpu)
        return float(np.median(wall)), float(np.median(cpu))

    one_wall, _ = timed(decoded[:1])
    many_wall, many_cpu = timed(decoded)
    return {"batch_1_ms": 1000 * one_wall, "batch_32_images_per_s": len(decoded) / many_wall,
            "batch_32_cpu_ms_per_image": 1000 * many_cpu / len(decoded)}


def measure(run: Path, engine: str, payloads: list[tuple[str, bytes]], args: argparse.Namespace) -> dict:
    """Both phases against one fresh server process running `engine`, with the server's CPU time for each."""
    load_average = os.getloadavg()[0]  # what other processes (and the previous round) left running on the cores
    port = free_port()
    requests = [request_bytes(port, name, data) for name, data in payloads]
    server = start_server(run, engine, port, args.server_args.split())
    try:
        served_by = get_json(port, "/model")["engine"]
        asyncio.run(single(port, requests, 20))  # warm-up: first calls allocate and pick kernels
        started, cpu_0 = time.perf_counter(), cpu_seconds(server.pid)
        lone = asyncio.run(single(port, requests, args.single))
        lone_s, cpu_1 = time.perf_counter() - started, cpu_seconds(server.pid)
        before = get_json(port, "/health")["batching"]
        busy = asyncio.run(load(port, requests, args.clients, args.requests, args.max_seconds))
        after, cpu_2 = get_json(port, "/health")["batching"], cpu_seconds(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=60)
    batches = after["batches"] - before["batches"]
    return {
        "engine": engine,
        "served_by": served_by,
        "load_average": load_average,
        "model_only": model_speed(run, engine, args.images),
        "single": {"requests": args.single, "ok": len(lone), "images_per_s": len(lone) / lone_s,
                   "server_cpu_ms_per_image": 1000 * (cpu_1 - cpu_0) / max(1, len(lone)), **percentiles(lone)},
        "load": {
            "clients": args.clients,
            **{k: v for k, v in busy.items() if k != "latencies"},
            "images_per_s": busy["ok"] / busy["seconds"],
            "server_cpu_ms_per_image": 1000 * (cpu_2 - cpu_1) / max(1, busy["ok"]),
            "mean_batch": (after["images"] - before["images"]) / max(1, batches),
            "largest_batch": after["largest"],
            **percentiles(busy["latencies"]),
        },
    }


COUNTS = ("requests", "ok", "errors")  # summed over rounds: one failed request in any round must show


def combine(rounds: list[dict]) -> dict:
    """One result from several rounds of the same engine: counts summed, every other number the median."""
    combined: dict = {}
    for key, value in rounds[0].items():
        values = [r[key] for r in rounds if key in r]
        if isinstance(value, dict):
            combined[key] = combine(values)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            combined[key] = sum(values) if key in COUNTS else float(np.median(values))
        else:
            combined[key] = value
    return combined


def print_table(results: list[dict], rounds: list[list[dict]], load_before: float, load_after: float) -> None:
    cores = os.cpu_count() or 1
    print(f"\n{cores} CPUs; 1-minute load average {load_before:.1f} before (other processes' share of the cores), "
          f"{load_after:.1f} after (ours included); {len(rounds)} round(s), medians\n")
    print("| engine | phase | requests | errors | img/s | p50 ms | p90 ms | p99 ms | mean batch | server CPU ms/img |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        name = f"{r['engine']} ({r['served_by']})"
        for phase in ("single", "load"):
            row = r[phase]
            label = "1 client, sequential" if phase == "single" else f"{row['clients']:.0f} clients"
            errors = row.get("errors", row["requests"] - row["ok"])
            speed = f"{row['images_per_s']:.1f}"
            if len(rounds) > 1:  # each round's figure next to the median: how much the machine's load moved it
                speed += " (" + ", ".join(f"{one[i][phase]['images_per_s']:.1f}" for one in rounds) + ")"
            print(f"| {name} | {label} | {row['requests']} | {errors} | {speed} | "
                  f"{row['p50']:.1f} | {row['p90']:.1f} | {row['p99']:.1f} | {row.get('mean_batch', 1):.1f} | "
                  f"{row['server_cpu_ms_per_image']:.1f} |")
        alone = r["model_only"]
        print(f"| {name} | model alone, in-process | | | {alone['batch_32_images_per_s']:.1f} (batch 32) | "
              f"{alone['batch_1_ms']:.1f} (batch 1) | | | 32 | {alone['batch_32_cpu_ms_per_image']:.1f} |")
    print(f"\nserver CPU ms/img under load -> what {cores} cores to itself would serve (CPU-bound ceiling):")
    for r in results:
        ms = r["load"]["server_cpu_ms_per_image"]
        print(f"  {r['engine']}: {1000 * cores / ms:.0f} img/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="Run folder to serve (default: train a small Lite0 run).")
    parser.add_argument("--engines", default="torch,onnx,int8", help="`serve --engine` values to compare.")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000, help="Requests in the load phase.")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="Time cap of each load phase.")
    parser.add_argument("--single", type=int, default=100, help="Sequential requests for single-image latency.")
    parser.add_argument("--server-args", default="", help="Extra `serve` options, e.g. '--batch-wait-ms 5'.")
    parser.add_argument("--repeats", type=int, default=1, help="Rounds of all engines, interleaved; medians.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = parser.parse_args()

    run, images = ensure_run(args.run)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for engine in set(engines) & {"onnx", "int8"}:
        ensure_export(run, engine)
    payloads = [(p.name, p.read_bytes()) for p in images]
    args.images = images
    load_before = os.getloadavg()[0]
    rounds = [[measure(run, engine, payloads, args) for engine in engines] for _ in range(args.repeats)]
    load_after = os.getloadavg()[0]
    results = [combine([one[i] for one in rounds]) for i in range(len(engines))]
    print_table(results, rounds, load_before, load_after)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"run": str(run), "cpus": os.cpu_count(), "cpu": cpu.describe(), "load_average_before": load_before,
               "load_average_after": load_after, "repeats": args.repeats, "results": results, "rounds": rounds}
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
