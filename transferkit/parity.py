"""How an export is held to eager PyTorch: the check made before a file is written, and the int8 self-check that
travels inside the file and is repeated wherever it is loaded.

An int8 model's integer kernels differ between CPUs (with or without VNNI), so agreement measured where the file
was made does not prove it on the machine that serves it. The export stores a few of its validation images with
fp32's probabilities; the loader runs them again and refuses the file when they no longer agree (decision 0160).
Numpy only: the loader of an export need not import PyTorch.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from transferkit.task import multilabel
from transferkit.task.calibration import decide

FP32_TOLERANCE = 1e-4  # max |probability difference| from eager PyTorch
INT8_MIN_AGREEMENT = 0.99  # top-1 (multi-label: per-label decision) agreement with eager PyTorch
INT8_MAX_ACCURACY_DROP = 0.01  # accuracy may fall by at most 1 point
PROBE_IMAGES = 16  # ~2.4 MB of pixels at 224 px: enough to catch a kernel that answers differently
PROBE_SLACK = 0.02  # probability drift allowed on another CPU beyond twice the drift seen at export
PROBES_KEY = "int8_probes"  # the ONNX metadata entry that carries them


@dataclass
class Check:
    """How the export compares with eager PyTorch on the run's validation images (accuracies need labels)."""

    images: int
    max_abs_diff: float
    agreement: float
    accuracy_torch: float | None
    accuracy_export: float | None
    decision: str = "top-1"  # what `agreement` counts: top-1 labels, or per (image, label) decisions ("label")

    def failure(self, int8: bool) -> str | None:
        """Why the export must be refused, or None: fp32 must match; int8 must agree and keep its accuracy."""
        if not int8:
            return None if self.max_abs_diff <= FP32_TOLERANCE else (
                f"probabilities differ from PyTorch by {self.max_abs_diff:.1e} (allowed {FP32_TOLERANCE:.0e})")
        if self.agreement < INT8_MIN_AGREEMENT:
            return (f"int8 {self.decision} agreement with PyTorch {self.agreement:.1%} "
                    f"(needs >= {INT8_MIN_AGREEMENT:.0%})")
        labelled = self.accuracy_torch is not None and self.accuracy_export is not None
        if labelled and self.accuracy_torch - self.accuracy_export > INT8_MAX_ACCURACY_DROP:
            return (f"int8 accuracy {self.accuracy_export:.4f} vs PyTorch {self.accuracy_torch:.4f} "
                    f"(may drop by {INT8_MAX_ACCURACY_DROP:.2f} at most)")
        return None


def decisions(probs: np.ndarray, thresholds: np.ndarray | None, threshold: float | None = None) -> np.ndarray:
    """The decided labels (a binary run's at its operating `threshold`), or a multi-label run's per (image, label)
    decisions at its `thresholds`."""
    return decide(probs, threshold) if thresholds is None else multilabel.decide(probs, thresholds)


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None,
            thresholds: np.ndarray | None = None, threshold: float | None = None) -> Check:
    """Single-label: agreement of the decided labels (top-1, or a binary run's `threshold`) and accuracy.
    Multi-label (`thresholds`): the same per (image, label) decision, so accuracy is 1 - Hamming loss."""
    decide_ref, decide_cand = decisions(reference, thresholds, threshold), decisions(candidate, thresholds, threshold)
    if thresholds is not None and labels is not None:
        labels = labels > 0.5
    return Check(
        images=len(reference),
        max_abs_diff=float(np.abs(reference - candidate).max()),
        agreement=float((decide_ref == decide_cand).mean()),
        accuracy_torch=None if labels is None else float((decide_ref == labels).mean()),
        accuracy_export=None if labels is None else float((decide_cand == labels).mean()),
        decision="top-1" if thresholds is None else "label",
    )


def make_probes(pixels: np.ndarray, reference: np.ndarray, candidate: np.ndarray,
                thresholds: np.ndarray | None, threshold: float | None = None) -> str:
    """The self-check to store in an int8 file: up to PROBE_IMAGES validation images on which int8 and fp32 agreed
    here, as uint8 pixels (exact: the pipeline's pixels are uint8 / 255), with fp32's probabilities and the largest
    drift int8 showed on them."""
    agreed = np.flatnonzero(np.all((decisions(reference, thresholds, threshold) ==
                                    decisions(candidate, thresholds, threshold))
                                   .reshape(len(reference), -1), axis=1))
    chosen = agreed[np.linspace(0, len(agreed) - 1, min(PROBE_IMAGES, len(agreed))).round().astype(int)]
    drift = float(np.abs(reference[chosen] - candidate[chosen]).max()) if len(chosen) else 0.0
    buffer = io.BytesIO()
    np.savez_compressed(buffer, pixels=np.rint(pixels[chosen] * 255).astype(np.uint8),
                        reference=reference[chosen].astype(np.float32))
    return json.dumps({"npz": base64.b64encode(buffer.getvalue()).decode("ascii"), "drift": drift})


def probe_failure(stored: str | None, run: Callable[[np.ndarray], np.ndarray],
                  thresholds: np.ndarray | None, threshold: float | None = None) -> str | None:
    """Why this int8 file must not be used on this machine, or None when its stored images still agree with fp32."""
    if stored is None:
        return "it carries no self-check images (exported by an older transferkit): export it again"
    probes = json.loads(stored)
    with np.load(io.BytesIO(base64.b64decode(probes["npz"]))) as arrays:
        pixels = arrays["pixels"].astype(np.float32) * np.float32(1 / 255)
        reference = arrays["reference"]
    if not len(pixels):
        return "it carries no self-check images: export it again"
    outputs = run(pixels)
    changed = decisions(reference, thresholds, threshold) != decisions(outputs, thresholds, threshold)
    drift = float(np.abs(reference - outputs).max())
    allowed = 2 * probes["drift"] + PROBE_SLACK
    if changed.any() or drift > allowed:
        wrong = int(changed.reshape(len(pixels), -1).any(axis=1).sum())
        return (f"on this CPU it disagrees with fp32 on {wrong} of its {len(pixels)} self-check images "
                f"(probabilities off by up to {drift:.2f}, allowed {allowed:.2f})")
    return None
