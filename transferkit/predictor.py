"""Predict from a run folder with the fastest engine it allows: its ONNX export (int8, then fp32) through ONNX
Runtime, numpy and Pillow alone, so `predict` and `serve` start without importing PyTorch or timm; else the run's
PyTorch model (`transferkit.runs.run.Run`, imported only then)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from transferkit.data.boxes import Box
from transferkit.data.content import file_digest
from transferkit.data.images import load_image
from transferkit.data.preprocess import Preprocess
from transferkit.errors import UserError
from transferkit.parity import INT8_MIN_AGREEMENT, PROBES_KEY, probe_failure
from transferkit.prediction import averaged, ensemble_members
from transferkit.progress import print_warning
from transferkit.runs.folder import check_run_folder, require_run_dir
from transferkit.task import multilabel

if TYPE_CHECKING:
    from transferkit.runs.run import Run

PREDICT_ENGINES = ("auto", "int8", "onnx", "torch")
EXPORT_FILES = {"int8": "model.int8.onnx", "onnx": "model.onnx"}  # "auto" tries them in this order: fastest first
# An exported ensemble: one export per member (in its own run folder) and this file, which names and weighs them.
ENSEMBLE_EXPORTS = {"int8": "ensemble.int8.json", "onnx": "ensemble.onnx.json"}
BATCH_SIZE = 32  # images decoded and held as pixels at once (~19 MB at 224 px)
# Images per ONNX Runtime call: on a CPU the time per image grows with the batch, whose activations leave the
# caches, so 2 per call beat 1 and 32 (decision 0162). Batching still pays in the server: one trip to the model
# thread per batch.
ORT_BATCH = 2


def thread_budget() -> int:
    """Threads one engine may use: the cores this process may run on, divided among `serve --workers N`
    (TRANSFERKIT_THREADS), so N processes never oversubscribe the CPU."""
    return int(os.environ.get("TRANSFERKIT_THREADS", 0)) or len(os.sched_getaffinity(0))


class OnnxSession:
    """ONNX Runtime on the CPU, called like a module on a batch of [0, 1] pixels (numpy or CPU tensors)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # No spin-waiting between calls: a server's single requests were ~40% slower with spinning threads.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = thread_budget()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, pixels) -> np.ndarray:
        array = np.ascontiguousarray(pixels, dtype=np.float32)
        return np.concatenate([self.session.run(None, {self.input_name: array[i : i + ORT_BATCH]})[0]
                               for i in range(0, len(array), ORT_BATCH)])


class OnnxPredictor:
    """A classifier from its .onnx file alone: classes and preprocessing come from the file's metadata.

    Offers Run's prediction methods, so a server or `predict` can use either without caring which."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._session = OnnxSession(self.path)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for unreadable files
            raise UserError(f"cannot load {self.path}: {str(exc).splitlines()[0][:200]}") from None
        self.metadata: dict[str, str] = self._session.session.get_modelmeta().custom_metadata_map
        if "classes" not in self.metadata or "preprocessing" not in self.metadata:
            raise UserError(f"{self.path} is not a transferkit export (no classes/preprocessing in its metadata)")
        self.classes: list[str] = json.loads(self.metadata["classes"])
        self.preprocess = Preprocess.from_dict(json.loads(self.metadata["preprocessing"]))
        self.box_margin = float(json.loads(self.metadata.get("box_margin", "0")))
        multi = self.metadata.get("task") == multilabel.TASK
        self.thresholds = multilabel.thresholds_of(json.loads(self.metadata["thresholds"]), self.classes) if multi \
            else None
        self.threshold: float | None = json.loads(self.metadata.get("threshold", "null"))  # a binary run's cut
        if self.metadata.get("quantization", "none") != "none" and (
                reason := probe_failure(self.metadata.get(PROBES_KEY), self._session, self.thresholds, self.threshold)):
            raise UserError(f"{self.path.name} is not safe to use here: {reason}")

    def probabilities(self, paths: list[str], crops: list[Box | None] | None = None) -> np.ndarray:
        """(N, classes) probabilities for image files, cropped to `crops` if given."""
        return probabilities_of_files(self, paths, crops)

    def probabilities_of_images(self, images: list[Image.Image]) -> np.ndarray:
        """(N, classes) probabilities for decoded RGB images already in memory (a server's batch)."""
        return self._session(self.preprocess.pixels(images))


class EnsemblePredictor:
    """An exported ensemble (`transferkit export` of an ensemble run folder): each member's ONNX export, with its own
    preprocessing and calibration inside, and the weighted average of their probabilities. No PyTorch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {path}: {exc}") from None
        self.members = [_export_predictor(path.parent / member["run"], spec["engine"]) for member in spec["members"]]
        self.weights = [float(member["weight"]) for member in spec["members"]]
        self.classes: list[str] = spec["classes"]
        if any(member.classes != self.classes for member in self.members):
            raise UserError(f"the exports {path} names do not share its classes: export the ensemble again")
        first = self.members[0]
        self.box_margin, self.thresholds, self.preprocess = first.box_margin, first.thresholds, first.preprocess
        self.threshold: float | None = spec.get("threshold")

    def probabilities(self, paths: list[str], crops: list[Box | None] | None = None) -> np.ndarray:
        return probabilities_of_files(self, paths, crops)  # each image decoded once for all members

    def probabilities_of_images(self, images: list[Image.Image]) -> np.ndarray:
        return averaged([member.probabilities_of_images(images) for member in self.members], self.weights)


def probabilities_of_files(predictor: OnnxPredictor | EnsemblePredictor, paths: list[str],
                           crops: list[Box | None] | None) -> np.ndarray:
    """(N, classes) probabilities of image files: decoded in threads (Pillow releases the GIL), a batch at a time
    so memory stays flat."""
    crops = crops or [None] * len(paths)
    with ThreadPoolExecutor(max(1, min(4, thread_budget()))) as pool:
        load = partial(load_image, reduce_to=predictor.preprocess.resize_size)
        outputs = [predictor.probabilities_of_images(list(pool.map(load, paths[i : i + BATCH_SIZE],
                                                                   crops[i : i + BATCH_SIZE])))
                   for i in range(0, len(paths), BATCH_SIZE)]
    return np.concatenate(outputs) if outputs else np.zeros((0, len(predictor.classes)), dtype=np.float32)


def load_predictor(run_dir: str | Path, engine: str = "auto") -> Run | OnnxPredictor | EnsemblePredictor:
    """"auto": the fastest export made from the run's current weights (int8, then fp32 ONNX), else PyTorch.

    An int8 export only exists if it passed its agreement and accuracy check, and is used only if its self-check
    passes on this CPU too (transferkit.parity), so preferring it is safe."""
    if engine not in PREDICT_ENGINES:
        raise UserError(f"unknown engine '{engine}': choose one of {', '.join(PREDICT_ENGINES)}")
    run_dir = Path(run_dir)
    if engine == "torch":
        return _torch_run(run_dir)
    require_run_dir(run_dir)
    ensemble = ensemble_members(run_dir) is not None
    files = ENSEMBLE_EXPORTS if ensemble else EXPORT_FILES
    load = _ensemble_predictor if ensemble else _export_predictor
    if engine != "auto":
        return load(run_dir, engine)
    kinds = [kind for kind in files if (run_dir / files[kind]).is_file()]
    for position, kind in enumerate(kinds):
        try:
            return load(run_dir, kind)
        except UserError as exc:
            fallback = files[kinds[position + 1]] if position + 1 < len(kinds) else "PyTorch"
            print_warning("warning:", f"{exc}; using {fallback} instead")
    return _torch_run(run_dir)


def _torch_run(run_dir: Path) -> Run:
    check_run_folder(run_dir)  # before PyTorch is imported
    from transferkit.runs.run import open_run

    return open_run(run_dir)


def _ensemble_predictor(run_dir: Path, kind: str) -> EnsemblePredictor:
    path = run_dir / ENSEMBLE_EXPORTS[kind]
    if not path.is_file():
        flag = " --int8" if kind == "int8" else ""
        raise UserError(f"{run_dir} is an ensemble with no {path.name}: run `transferkit export {run_dir}{flag}` "
                        "first (it exports each member), or use --engine torch")
    return EnsemblePredictor(path)


def _export_predictor(run_dir: Path, kind: str) -> OnnxPredictor:
    path = run_dir / EXPORT_FILES[kind]
    if not path.is_file():  # an int8 export may have been refused: never send the user back there in a circle
        how = (f"`transferkit export {run_dir} --int8` writes one only if int8 keeps PyTorch's predictions (>= "
               f"{INT8_MIN_AGREEMENT:.0%} agreement); where it was refused, use --engine onnx (after `transferkit "
               f"export {run_dir}`)") if kind == "int8" else f"run `transferkit export {run_dir}` first"
        raise UserError(f"{run_dir} has no {path.name}: {how}, or use --engine torch")
    predictor = OnnxPredictor(path)
    weights = run_dir / "model.safetensors"
    if weights.is_file() and predictor.metadata.get("weights_digest") not in (None, file_digest(weights)):
        raise UserError(f"{path} was exported from other weights: run `transferkit export {run_dir}` again")
    return predictor
