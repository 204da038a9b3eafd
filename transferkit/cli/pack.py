"""`transferkit pack`: a dataset into WebDataset tar shards (written by the shards work, registered here)."""

from __future__ import annotations
