"""Serving a run over HTTP: `create_app(predictor)` (FastAPI) behind `transferkit serve RUN`."""

from transferkit.serve.app import create_app
from transferkit.serve.uploads import Limits

__all__ = ["Limits", "create_app"]
