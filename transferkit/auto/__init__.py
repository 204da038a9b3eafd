"""Automatic choices: which backbone transfers best to a dataset (cross-validated probes on cached frozen
features, then a short fine-tuning race of the two best), its head, its learning rate (the range test) and how
much to fine-tune in a time budget."""

from transferkit.auto.orchestrate import AutoResult, auto
from transferkit.auto.range_data import lr_find_data
from transferkit.auto.range_test import LRFind, lr_find, plot_lr_find

__all__ = ["AutoResult", "LRFind", "auto", "lr_find", "lr_find_data", "plot_lr_find"]
