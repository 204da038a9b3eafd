"""`transferkit doctor`: data health before training (unreadable files, duplicates, leakage, imbalance, tiny and
possibly mislabeled images), each finding with its files, as plain data shared by the CLI's text and JSON."""

from transferkit.doctor.options import DoctorOptions

__all__ = ["DoctorOptions", "diagnose"]


def __getattr__(name: str):
    # Lazy: the options (and `--help`) must not import the models that `diagnose` embeds with.
    if name == "diagnose":
        from transferkit.doctor.report import diagnose

        return diagnose
    raise AttributeError(f"module 'transferkit.doctor' has no attribute '{name}'")
