"""`transferkit serve RUN`: the run behind an HTTP API and a web page (FastAPI + uvicorn), on loopback by default."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from transferkit.cli.main import app
from transferkit.cli.output import ENGINE
from transferkit.errors import UserError
from transferkit.progress import console


def check_port(host: str, port: int) -> None:
    """A taken port is bad input: one line, exit 2, before a model is loaded (uvicorn would log and exit 1)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@app.command()
def serve(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes, each with its own model.")] = 1,
    engine: ENGINE = "auto",
    max_file_mb: Annotated[float, typer.Option(min=0.001, help="Largest accepted file, MB.")] = 10.0,
    max_files: Annotated[int, typer.Option(min=1, help="Most files in one request.")] = 32,
    max_pixels: Annotated[int, typer.Option(min=1, help="Largest accepted image, pixels (decompression bombs).")] = (
        40_000_000
    ),
    max_batch: Annotated[int, typer.Option(min=1, help="Most images in one batch (one model-thread trip).")] = 32,
    batch_wait_ms: Annotated[float, typer.Option(min=0.0, help="How long a batch waits for more requests.")] = 3.0,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
) -> None:
    """Serve a run: POST /predict, GET /health, /model, the web page at /, API docs at /docs."""
    import uvicorn

    from transferkit.predictor import load_predictor
    from transferkit.serve.app import CONFIG_ENV, create_app
    from transferkit.serve.uploads import MB, Limits

    file_bytes = int(max_file_mb * MB)
    # The request cap must at least fit one file of the allowed size.
    request_bytes = max(Limits.max_request_bytes, file_bytes)
    limits = Limits(file_bytes, max_files=max_files, max_request_bytes=request_bytes, max_pixels=max_pixels)
    check_port(host, port)
    predictor = load_predictor(run, engine)  # a bad run folder fails here, as one line
    console.print(f"serving {run} ({type(predictor).__name__}) on http://{host}:{port}/  (docs: /docs)")
    options = dict(host=host, port=port, access_log=access_log, log_level="info")
    if workers == 1:
        server = create_app(predictor, run_dir=run, limits=limits, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
        uvicorn.run(server, **options)
        return
    del predictor  # each worker process loads its own; this one only proved the run folder loads
    settings = dict(run=str(run.resolve()), engine=engine, workers=workers, limits=asdict(limits))
    settings.update(max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    os.environ[CONFIG_ENV] = json.dumps(settings)
    uvicorn.run("transferkit.serve.app:app_from_env", factory=True, workers=workers, **options)
