"""`transferkit doctor`: data health before training (unreadable files, duplicates, leakage, imbalance, tiny and
likely mislabeled images), each finding with its files, as plain data shared by the CLI's text and JSON."""

from transferkit.doctor.report import DoctorOptions, diagnose

__all__ = ["DoctorOptions", "diagnose"]
