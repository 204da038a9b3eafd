"""Collect a dataset from a CSV of image URLs: bounded concurrent downloads, each body validated as an image,
stored once under its content hash in the folder layout `transferkit train` reads, resumable, with a report."""

from transferkit.fetch.collect import REPORT_NAME, FetchOptions, fetch_dataset
from transferkit.fetch.download import Limits
from transferkit.fetch.store import STATE_NAME

__all__ = ["REPORT_NAME", "STATE_NAME", "FetchOptions", "Limits", "fetch_dataset"]
