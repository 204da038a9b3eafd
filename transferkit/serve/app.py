"""The HTTP server: FastAPI app with /predict (batched), /health, /model, the web page at / and OpenAPI at /docs.

Every refusal and every failure is a JSON `{"error": ...}` with a 4xx/5xx status, never a traceback: the server
is meant to be left running in front of people who upload whatever they have.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.exceptions import HTTPException

import transferkit
from transferkit.data.preprocess import Preprocess
from transferkit.prediction import top_predictions
from transferkit.predictor import OnnxPredictor, load_predictor
from transferkit.serve.batching import Batcher
from transferkit.serve.uploads import FIELD, Limits, UploadError, decode_upload, read_uploads
from transferkit.task import multilabel
from transferkit.task.calibration import decide

STATIC = Path(__file__).parent / "static"
CONFIG_ENV = "TRANSFERKIT_SERVE_CONFIG"
# The page loads nothing from elsewhere; the policy makes that a guarantee, not a habit.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
log = logging.getLogger("transferkit.serve")


class Predictor(Protocol):
    """What the server needs from a model: `transferkit.runs.run.Run` or an exported (ONNX) predictor. A multi-label one
    also has `thresholds` (per-label decision thresholds, in class order); without it, top-k classes are served."""

    classes: list[str]
    preprocess: Preprocess  # its resize size: how small uploads may be decoded

    def probabilities_of_images(self, images: list[Image.Image]) -> np.ndarray: ...


class GradCam:
    """Grad-CAM overlays as PNG. It needs the PyTorch model: an ONNX predictor has none, so the run is loaded from
    its folder on first use (in the model thread, so no lock is needed)."""

    def __init__(self, predictor: Predictor, run_dir: Path | None) -> None:
        self._run = predictor if hasattr(predictor, "explained") else None  # a Run (or an Ensemble) has its models
        self._run_dir = run_dir

    def pngs(self, images: list[Image.Image], targets: list[int]) -> list[str]:
        from transferkit.insight.explain import explain_images
        from transferkit.runs.run import open_run

        if self._run is None:
            if self._run_dir is None:
                raise UploadError(501, "Grad-CAM needs the run folder, and this server was started without one")
            self._run = open_run(self._run_dir)
        return [_png_base64(overlay) for overlay in explain_images(self._run, images, targets)]


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _multipart_body() -> dict:
    """The request body for the OpenAPI docs: the handler reads the stream itself (to enforce limits while reading),
    so FastAPI cannot infer it."""
    files = {"type": "array", "items": {"type": "string", "format": "binary"}}
    schema = {"type": "object", "properties": {FIELD: files}, "required": [FIELD]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def create_app(
    predictor: Predictor,
    *,
    run_dir: str | Path | None = None,
    limits: Limits | None = None,
    max_batch: int = 32,
    batch_wait_ms: float = 3.0,
) -> FastAPI:
    """The server for one model. `run_dir` (default: the predictor's `.path`) supplies /model's metadata and the
    PyTorch model for Grad-CAM when the predictor is not a `Run`."""
    limits = limits or Limits()
    folder = Path(run_dir) if run_dir is not None else _run_folder(predictor)
    decode = partial(decode_upload, max_pixels=limits.max_pixels, reduce_to=predictor.preprocess.resize_size)
    batcher = Batcher(decode, predictor.probabilities_of_images, max_batch, batch_wait_ms / 1000)
    explainer = GradCam(predictor, folder)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    # FastAPI's own /docs and /redoc load their scripts from a CDN: blank pages on an offline machine.
    app = FastAPIOffline(
        title="transferkit",
        version=transferkit.__version__,
        summary="Image classification with a model trained by transfer learning.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health")
    async def health() -> dict:
        """Liveness, plus batching counters (batches, images, largest, mean batch size)."""
        return {"status": "ok", "batching": batcher.stats.to_dict()}

    @app.get("/model")
    def model_info() -> dict:
        """Classes, backbone, input size, the run's metrics.json (if any) and this server's upload limits."""
        return _model_info(predictor, folder, limits)

    _add_predict(app, predictor, batcher, limits, explainer)
    return app


def _add_predict(app: FastAPI, predictor: Predictor, batcher: Batcher, limits: Limits, explainer: GradCam) -> None:
    """POST /predict: uploads batched with other requests' through the model, Grad-CAM on request."""

    @app.post("/predict", openapi_extra=_multipart_body())
    async def predict(
        request: Request,
        gradcam: bool = Query(False, description="Add a base64 PNG Grad-CAM overlay to each prediction."),
        top_k: int = Query(3, ge=1, description="How many classes to list per image (not for a multi-label run)."),
    ) -> dict:
        """Classify uploaded images (multipart field `files`, one or many). A multi-label run answers with every
        label at or above its threshold (`labels`) and each label's probability, as `transferkit predict` does."""
        with batcher.arriving():
            uploads = await read_uploads(request, limits)
        names = [upload.filename for upload in uploads]
        images, probs = await batcher.predict(uploads)
        del uploads  # the raw bytes are not needed any more; a batch of big files is a lot of memory
        predictions = [{"filename": r.pop("path"), **r} for r in _records(predictor, names, probs, top_k)]
        if gradcam:
            targets = decide(probs, _threshold(predictor)).tolist()  # explain what the model predicted
            pngs = await batcher.run_in_model_thread(explainer.pngs, images, targets)
            for prediction, png in zip(predictions, pngs, strict=True):
                prediction["gradcam_png"] = png
        return {"predictions": predictions}


def _run_folder(predictor: Predictor) -> Path | None:
    """A Run's `.path` is its folder; an exported predictor's is its model file, which lives in the run folder."""
    path = getattr(predictor, "path", None)
    return None if path is None else (Path(path) if Path(path).is_dir() else Path(path).parent)


def _records(predictor: Predictor, names: list[str], probs: np.ndarray, top_k: int) -> list[dict]:
    """`predict --json`'s records: top-k classes, or a multi-label run's labels above their thresholds."""
    if (thresholds := _thresholds(predictor)) is not None:
        return multilabel.predictions(names, probs, predictor.classes, thresholds)
    return top_predictions(names, probs, predictor.classes, top_k, _threshold(predictor))


def _thresholds(predictor: Predictor) -> np.ndarray | None:
    return getattr(predictor, "thresholds", None)


def _threshold(predictor: Predictor) -> float | None:
    """A binary run's cut on the second class's probability (None: the larger probability wins)."""
    return getattr(predictor, "threshold", None)


def _model_info(predictor: Predictor, folder: Path | None, limits: Limits) -> dict:
    meta = _read_json(folder / "meta.json") if folder else None
    meta = meta or getattr(predictor, "meta", None) or {}
    thresholds = _thresholds(predictor)
    return {
        "classes": list(predictor.classes),
        "backbone": meta.get("backbone"),
        "timm_name": meta.get("timm_name"),
        "image_size": meta.get("image_size"),
        "task": meta.get("task"),
        "thresholds": None if thresholds is None else dict(zip(predictor.classes, thresholds.tolist(), strict=True)),
        "threshold": _threshold(predictor),
        "operating_point": meta.get("operating_point"),
        "temperature": meta.get("temperature"),
        "tta": meta.get("tta"),
        "engine": type(predictor).__name__,
        "metrics": _read_json(folder / "metrics.json") if folder else None,
        "limits": asdict(limits),
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def install_error_handlers(app: FastAPI) -> None:
    """One JSON shape for every failure: {"error": "one line"}."""

    @app.exception_handler(UploadError)
    async def refused(_request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": problems or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(_request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server log for whoever runs it, never to the client.
        log.error("unhandled error while serving a request", exc_info=exc)
        return JSONResponse({"error": "internal server error"}, status_code=500)


def app_from_env() -> FastAPI:
    """uvicorn factory for `--workers N`: each worker process builds its own app from the CLI's settings."""
    config = json.loads(os.environ[CONFIG_ENV])
    # N processes on C cores: C/N threads each, or they oversubscribe the CPU and all get slower.
    threads = max(1, len(os.sched_getaffinity(0)) // config["workers"])
    os.environ["TRANSFERKIT_THREADS"] = str(threads)  # ONNX Runtime's sessions (transferkit.predictor)
    predictor = load_predictor(config["run"], config["engine"])
    if not isinstance(predictor, OnnxPredictor):
        import torch

        torch.set_num_threads(threads)
    return create_app(
        predictor,
        run_dir=config["run"],
        limits=Limits(**config["limits"]),
        max_batch=config["max_batch"],
        batch_wait_ms=config["batch_wait_ms"],
    )
