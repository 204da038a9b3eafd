"""The report's ensemble section (decision 0275): its members, each one's validation and evaluated scores beside
the ensemble's, and what averaging gained over the first member (auto's race winner, or train's first backbone)."""

from __future__ import annotations

import json
from pathlib import Path

from transferkit.prediction import ENSEMBLE


def ensemble_section(folder: Path, meta: dict, metrics: dict | None) -> dict | None:
    """None for a single run. Rows: each member (its val scores from the gain record, its metrics.json's), then
    the ensemble's."""
    spec = meta.get(ENSEMBLE)
    if spec is None:
        return None
    gain, rows = spec.get("gain", {}), []
    for member in spec["members"]:
        name = Path(member["path"]).name
        val = gain.get("members", {}).get(name, {})
        evaluated = _metrics(folder / member["path"] / "metrics.json")
        rows.append({"name": name, "backbone": member["backbone"], "weight": member["weight"],
                     "val_loss": val.get("val_loss"), "val_acc": val.get("val_acc"),
                     "loss": evaluated.get("loss"), "accuracy": evaluated.get("accuracy")})
    ours = gain.get("ensemble", {})
    rows.append({"name": "ensemble", "backbone": "average of the above", "weight": 1.0,
                 "val_loss": ours.get("val_loss"), "val_acc": ours.get("val_acc"),
                 "loss": (metrics or {}).get("loss"), "accuracy": (metrics or {}).get("accuracy")})
    return {"rows": rows, "gain": gain, "split": (metrics or {}).get("split")}


def ensemble_model_rows(meta: dict) -> list[tuple[str, str]]:
    """The model table's rows for an ensemble (its members' own rows are in their reports)."""
    members = ", ".join(f"{m['path']} ({m['backbone']}, weight {m['weight']:.2f})" for m in meta[ENSEMBLE]["members"])
    return [("backbone", meta["backbone"]), ("members", members),
            ("task", f"{meta['task']}, {len(meta['classes'])} classes"),
            ("created", f"{meta['created']} by transferkit {meta['transferkit_version']}")]


def _metrics(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
