"""report.html: a run's data, training, metrics, mistakes and Grad-CAM on one self-contained page."""

from transferkit.report.build import write_report

__all__ = ["write_report"]
