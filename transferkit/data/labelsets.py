"""Multi-label CSV labels: `cat|outdoor` is the set {cat, outdoor}. A set is kept as one canonical string (sorted,
no repeats), so splits stratify on it like on a class name and split.json stays a list of strings."""

from __future__ import annotations

from transferkit.errors import UserError

SEPARATOR = "|"


def is_label_set(label: str) -> bool:
    return SEPARATOR in label


def canonical_label_set(raw: str, where: str) -> str:
    """`b| a|a` -> `a|b`; an empty part (`cat|`, `a||b`) is a mistake in the CSV, not a label."""
    parts = [part.strip() for part in raw.split(SEPARATOR)]
    if not all(parts):
        raise UserError(f"{where}: empty label in '{raw}' (several labels are separated by '{SEPARATOR}')")
    return SEPARATOR.join(sorted(set(parts)))


def label_set(label: str) -> tuple[str, ...]:
    """The labels of a canonical label-set string."""
    return tuple(label.split(SEPARATOR))
