"""An ensemble run folder (`transferkit auto` with `ensemble: true`, decision 0275): complete member run folders
under RUN/members/NAME, averaged. `Ensemble` offers a Run's interface (classes, task, probabilities, predict,
evaluate), so the commands, the report and the server use it as they use one run.

    RUN/meta.json     format_version, classes, task, data_split, threshold and
                      "ensemble": {"members": [{"path": "members/NAME", "weight", "backbone"}...], "gain": {...}}
    RUN/split.json    the members' split (they trained on the same one)
    RUN/members/NAME  a complete run folder each
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

import transferkit
from transferkit.data.boxes import Box, crop_regions
from transferkit.data.sources import DatasetIndex
from transferkit.errors import UserError
from transferkit.fileio import atomic_write
from transferkit.options import as_loss
from transferkit.prediction import ENSEMBLE, averaged, ensemble_members
from transferkit.runs.files import FORMAT_VERSION, write_json
from transferkit.runs.run import Run
from transferkit.task.calibration import decide
from transferkit.task.kinds import task_of

MEMBERS = "members"


class Ensemble(Run):
    """Member runs, each with its own preprocessing, test-time views and temperature; the ensemble's probabilities
    are their weighted average (its own temperature is 1: the members are calibrated already)."""

    def __init__(self, path: str | Path, device: str = "auto", loaded: list[Run] | None = None) -> None:
        """`loaded`: the member runs, already open in the order meta.json lists them (else each is loaded)."""
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"ensemble {self.path} has format_version {self.meta.get('format_version')}; "
                            f"this transferkit reads {FORMAT_VERSION}")
        listed = ensemble_members(self.path) or []
        missing = [str(folder) for folder, _ in listed if not (folder / "meta.json").is_file()]
        if not listed or missing:
            raise UserError(f"ensemble {self.path} lacks its member run folders: {', '.join(missing) or 'none listed'}")
        self.members = loaded if loaded is not None else [Run(folder, device) for folder, _ in listed]
        self.weights = [weight for _, weight in listed]
        self.classes = self.meta["classes"]
        if any(member.classes != self.classes for member in self.members):
            raise UserError(f"the members of ensemble {self.path} do not share its classes")
        self.task = task_of(self.meta)
        self.multilabel, self.binary = self.task.multilabel, self.task.binary
        first = self.members[0]
        self.thresholds, self.box_margin, self.preprocess = first.thresholds, first.box_margin, first.preprocess
        self.transform, self.model = first.transform, None
        self.tta, self.temperature = "none", 1.0
        self.threshold: float | None = self.meta.get("threshold")
        self.view_logits, self.metrics = None, None

    @property
    def explained(self) -> Run:
        """Grad-CAM explains the member of largest weight (the first of equals: auto lists the race's winner
        first); the ensemble decides which class it explains."""
        return self.members[int(np.argmax(self.weights))]

    def probabilities(self, paths: list[str], crops: list[Box | None] | None = None) -> np.ndarray:
        return averaged([member.probabilities(paths, crops) for member in self.members], self.weights)

    def logits(self, paths: list[str], crops: list[Box | None] | None = None) -> torch.Tensor:
        """Logits of the averaged probabilities, so evaluation scores the ensemble as it scores one run."""
        return self.task.logits_of(torch.from_numpy(self.probabilities(paths, crops)))

    def probabilities_of_images(self, images: list[Image.Image]) -> np.ndarray:
        return averaged([member.probabilities_of_images(images) for member in self.members], self.weights)


def ensemble_meta(members: list[Run], names: list[str], gain: dict) -> dict:
    """RUN/meta.json of an ensemble of equally weighted complete runs (moved to RUN/members/NAME). A binary
    ensemble decides at the mean of its members' validated thresholds, when they have one."""
    first = members[0]
    thresholds = [m.threshold for m in members if m.threshold is not None]
    return {
        "format_version": FORMAT_VERSION,
        "backbone": "ensemble of " + " + ".join(m.meta["backbone"] for m in members),
        **first.task.meta(),
        "data_split": first.meta["data_split"],
        "threshold": float(np.mean(thresholds)) if len(thresholds) == len(members) else None,
        "operating_point": first.meta.get("operating_point"),  # the members share the run's configuration
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "transferkit_version": transferkit.__version__,
        ENSEMBLE: {"members": [{"path": f"{MEMBERS}/{name}", "weight": 1 / len(members), "backbone": m.meta["backbone"]}
                               for name, m in zip(names, members, strict=True)], "gain": gain},
    }


def write_ensemble(folder: Path, members: list[Run], names: list[str], gain: dict) -> Ensemble:
    """Write RUN/meta.json (last: it marks the folder complete) and split.json for members already in place; the
    ensemble opened on the given member runs (not loaded again)."""
    atomic_write(folder / "split.json", (members[0].path / "split.json").read_text())
    write_json(folder / "meta.json", ensemble_meta(members, names, gain))
    return Ensemble(folder, loaded=members)


def ensemble_gain(runs: list[Run], names: list[str], index: DatasetIndex, monitor: str) -> dict:
    """Each finalist's and the equal-weight average's validation loss and accuracy, and whether the average beats
    the first (the winner) by `monitor`."""
    val = index.split("val")
    targets = np.array([runs[0].classes.index(s.label) for s in val])
    probs = [run.probabilities([s.path for s in val], crop_regions([s.box for s in val], run.box_margin)
                               if any(s.box for s in val) else None) for run in runs]
    thresholds = [run.threshold for run in runs]
    mean_threshold = float(np.mean(thresholds)) if None not in thresholds else None
    members = {name: val_scores(p, targets, run.threshold) for name, p, run in zip(names, probs, runs, strict=True)}
    ours = val_scores(averaged(probs, [1 / len(runs)] * len(runs)), targets, mean_threshold)
    winner = members[names[0]]
    better = as_loss(ours[monitor], monitor) < as_loss(winner[monitor], monitor)
    return {"monitor": monitor, "winner": {"name": names[0], **winner}, "ensemble": ours, "members": members,
            "better": bool(better), "val_images": len(val)}


def val_scores(probs: np.ndarray, targets: np.ndarray, threshold: float | None) -> dict:
    """Log loss (the negative log of the true class's calibrated probability), accuracy and balanced accuracy."""
    chosen = np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0)
    predicted = decide(probs, threshold)
    return {"val_loss": round(float(-np.log(chosen).mean()), 6),
            "val_acc": round(float((predicted == targets).mean()), 6),
            "val_balanced_acc": round(float(balanced_accuracy_score(targets, predicted)), 6)}
