"""Serving a run over HTTP: `create_app(predictor)` (FastAPI) behind `transferkit serve RUN`."""

from transferkit.serve.app import create_app, load_serving_predictor
from transferkit.serve.uploads import Limits

__all__ = ["Limits", "create_app", "load_serving_predictor"]
