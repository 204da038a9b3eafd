"""Ship a run: export its classifier to ONNX (fp32 or int8) or TorchScript, and predict from the export alone.

The exported graph takes what any image library can produce without knowing the backbone, float32 NCHW pixels in
[0, 1] after resize + centre crop, and returns class probabilities (N, classes): normalisation, samplewise centring
and binary-logit vs softmax live inside the graph, so a consumer only needs the file and its metadata. A model that
does not reproduce eager PyTorch on the run's validation images is refused, never written.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import transferkit
from transferkit import multilabel
from transferkit.cache import file_digest
from transferkit.data.boxes import Box
from transferkit.data.transforms import Preprocess
from transferkit.errors import UserError
from transferkit.export_check import pixel_batch, pixel_transform, validation_images
from transferkit.fileio import atomic_path
from transferkit.parity import PROBES_KEY, Check, compare, make_probes, probe_failure
from transferkit.progress import print_warning
from transferkit.run import Run, image_loader
from transferkit.training.loop import evaluate_logits, probabilities

FORMATS = ("onnx", "torchscript")
CALIBRATION_IMAGES = 256  # int8 ranges settle long before this; more only costs export time
TIMING_IMAGES = 64
BATCH_SIZE = 32
# Images per ONNX Runtime call: on a CPU the time per image grows with the batch, whose activations leave the caches;
# batching still pays in the server, just not inside the engine (decision 0217).
ORT_BATCH = 2


class ProbabilityModel(nn.Module):
    """The run's classifier with its input and output contract baked in: [0, 1] pixels in, probabilities out."""

    def __init__(self, run: Run) -> None:
        super().__init__()
        self.model = run.model
        self.binary, self.multilabel = run.binary, run.multilabel
        self.samplewise_center = bool(run.meta.get("samplewise_center", False))
        self.register_buffer("mean", torch.tensor(run.preprocess.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(run.preprocess.std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = (pixels - self.mean) / self.std  # the same arithmetic as eval_transform's Normalize
        if self.samplewise_center:
            images = images - images.mean(dim=(1, 2, 3), keepdim=True)
        return probabilities(self.model(images), self.binary, self.multilabel)


class _Session:
    """ONNX Runtime on the CPU, called like a module on a batch of pixels."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # No spin-waiting between calls: a server's single requests were ~40% slower with spinning threads.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The process's one thread budget is torch's: `serve --workers N` divides it, and ONNX Runtime's own default
        # (every core) would oversubscribe the CPU N times over.
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        array = pixels.contiguous().numpy() if isinstance(pixels, torch.Tensor) else pixels
        return np.concatenate([self.session.run(None, {self.input_name: array[i : i + ORT_BATCH]})[0]
                               for i in range(0, len(array), ORT_BATCH)])


Engine = nn.Module | _Session
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def _batches(pixels: torch.Tensor) -> Batches:
    return [(chunk, torch.zeros(0)) for chunk in pixels.split(BATCH_SIZE)]


def _outputs(engine: Engine, batches: Batches | torch.Tensor) -> np.ndarray:
    """Outputs of an engine over batches (or one tensor of pixels); PyTorch modules run as run.py runs them."""
    batches = _batches(batches) if isinstance(batches, torch.Tensor) else batches
    if isinstance(engine, nn.Module):
        return evaluate_logits(engine, batches)[0].numpy()
    return np.concatenate([engine(images) for images, _ in batches])


@dataclass
class ExportReport:
    """What `transferkit export` prints (and --json writes): the file, its check, its size and speed."""

    path: str
    format: str
    int8: bool
    size_mb: float
    check: Check
    export_img_s: float
    eager_img_s: float
    notes: list[str] = field(default_factory=list)


def default_out(run_dir: Path, fmt: str, int8: bool) -> Path:
    return run_dir / ("model.pt" if fmt == "torchscript" else "model.int8.onnx" if int8 else "model.onnx")


def export_metadata(run: Run, int8: bool) -> dict[str, str | list | dict]:
    """What a consumer of the file alone needs: classes and preprocessing (and a multi-label run's thresholds and
    a boxed run's margin), plus provenance (weights digest)."""
    extra = {key: run.meta[key] for key in ("thresholds", "box_margin") if key in run.meta}
    if run.multilabel:
        extra["output"] = "per-label sigmoid probabilities (N, labels); a label applies at or above its threshold"
    return {
        "classes": run.classes,
        "preprocessing": run.preprocess.to_dict(),
        "task": run.meta["task"],
        "backbone": run.meta["backbone"],
        "transferkit_version": transferkit.__version__,
        "weights_digest": file_digest(run.path / "model.safetensors"),
        "quantization": "int8 static QDQ, per-channel weights" if int8 else "none",
        "input": "float32 NCHW RGB pixels in [0, 1], resized and centre-cropped as in preprocessing",
        "output": "class probabilities (N, classes)",
        **extra,
    }


def export_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), str(path), input_names=["pixels"], output_names=["probabilities"],
                          dynamic_axes={"pixels": {0: "batch"}, "probabilities": {0: "batch"}}, opset_version=17,
                          dynamo=False)


def quantize_int8(source: Path, target: Path, pixels: torch.Tensor) -> None:
    """Static QDQ int8 (per-channel weights, uint8 activations: ORT's advice for x86 CPUs), calibrated on `pixels`.

    Weights use 7 bits (`reduce_range`): x86 CPUs without VNNI multiply u8 x s8 pairs into saturating int16 sums,
    which 8-bit weights overflow (wrong answers); 7-bit ones cannot, so one file is right on every CPU (decision
    0160)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            step = -(-len(pixels) // CALIBRATION_IMAGES)  # ceil: at most CALIBRATION_IMAGES, spread over classes
            self.chunks = iter(pixels[::step].split(8))

        def get_next(self) -> dict | None:
            chunk = next(self.chunks, None)
            return None if chunk is None else {"pixels": chunk.contiguous().numpy()}

    prepared = target.with_name(target.name + ".pre")
    # No CalibMaxIntermediateOutputs: ORT's MinMax calibrator discards what it collected each time it reaches that
    # count, so only the last batches would calibrate (and a multiple of it fails with "No data is collected").
    # What it keeps per batch is a min and a max per tensor: small.
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
            nodes_to_exclude=_float_nodes(prepared),
        )
    finally:
        prepared.unlink(missing_ok=True)


def _float_nodes(path: Path) -> list[str]:
    """Nodes that must stay float in the int8 model.

    - Shape arithmetic: TF-"SAME" padding (tf_efficientnet_lite*) computes pads from the input's shape with float
      Add/Div/Ceil; quantizing those rounds 225 to another number and changes the feature maps' size.
    - ProbabilityModel's own arithmetic (normalisation in, probabilities out): quantizing the output would round
      probabilities to 1/255 and create ties. The exporter names the classifier's nodes "/model/...".
    - The trained head ("/model/head/..."): negligible compute, and quantizing it tripled the largest probability
      error on a Lite0 run (0.16 -> 0.46) for no measurable speed."""
    import onnx

    graph = onnx.load(str(path)).graph
    shape_tensors = {tensor.name for tensor in graph.initializer}  # constants, then everything computed from shapes
    keep = []
    for node in graph.node:  # topologically sorted
        inputs = [name for name in node.input if name]
        if node.op_type in ("Shape", "Constant") or all(name in shape_tensors for name in inputs):
            shape_tensors.update(node.output)
            keep.append(node.name)
        elif not node.name.startswith("/model/") or node.name.startswith("/model/head/"):
            keep.append(node.name)
    if len(keep) == len(graph.node):
        raise RuntimeError("no quantizable classifier nodes found in the exported graph")
    return keep


def _set_metadata(path: Path, metadata: dict) -> None:
    """ONNX metadata values are strings: lists and dicts go in as JSON."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    onnx.save(model, str(path))


def images_per_second(engines: list[Engine], pixels: torch.Tensor, repeats: int = 3, min_seconds: float = 1.0
                      ) -> list[float]:
    """Median throughput of each engine over at least `repeats` passes and `min_seconds`, after a warm-up pass.
    Passes alternate between engines so that load from other processes (these machines are shared) hits all alike."""
    sample = pixels[:TIMING_IMAGES]
    if len(sample) < BATCH_SIZE:  # a handful of images would measure call overhead, not the model
        sample = sample.repeat((BATCH_SIZE + len(sample) - 1) // len(sample), 1, 1, 1)[:BATCH_SIZE]
    seconds: list[list[float]] = [[] for _ in engines]
    for engine in engines:
        _outputs(engine, sample)
    while len(seconds[0]) < repeats or (sum(map(sum, seconds)) < min_seconds and len(seconds[0]) < 50):
        for engine, times in zip(engines, seconds, strict=True):
            start = time.perf_counter()
            _outputs(engine, sample)
            times.append(time.perf_counter() - start)
    return [len(sample) / statistics.median(times) for times in seconds]


def _build(fmt: str, int8: bool, run: Run, wrapper: nn.Module, pixels: torch.Tensor, tmp: Path) -> Engine:
    """Write the candidate file to `tmp` and load it back as a module, the way its users will run it."""
    example = pixels[:2]
    if fmt == "torchscript":
        with warnings.catch_warnings():  # TorchScript is deprecated upstream; it still serves C++/LibTorch users
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(wrapper, example, check_trace=False)
            torch.jit.save(traced, str(tmp), _extra_files={"transferkit.json": json.dumps(export_metadata(run, int8))})
            return torch.jit.load(str(tmp))
    if int8:
        fp32 = tmp.with_name(tmp.name + ".fp32")
        try:
            export_onnx(wrapper, example, fp32)
            quantize_int8(fp32, tmp, pixels)
        finally:
            fp32.unlink(missing_ok=True)
    else:
        export_onnx(wrapper, example, tmp)
    _set_metadata(tmp, export_metadata(run, int8))
    return _Session(tmp)


def export_run(run_dir: str | Path, fmt: str = "onnx", int8: bool = False, out: str | Path | None = None,
               log: Callable[[str], None] = lambda _: None) -> ExportReport:
    """Export, check against eager PyTorch on the validation images, and only then move the file to `out`."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}': choose one of {', '.join(FORMATS)}")
    if int8 and fmt != "onnx":
        raise UserError("--int8 needs --format onnx")
    run = Run(run_dir)
    target = Path(out) if out else default_out(run.path, fmt, int8)
    if target.is_dir():
        raise UserError(f"--out {target} is a folder; give a file name")
    wrapper = ProbabilityModel(run).eval()
    pixels, labels, notes = validation_images(run)
    for note in notes:
        log(f"warning: {note}")
    if not len(pixels):
        if int8:
            raise UserError(f"int8 needs the run's validation images to calibrate and check; none found in {run.path}")
        size = run.preprocess.image_size
        pixels = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        notes.append("checked on random pixels instead")
    with atomic_path(target) as tmp:
        candidate = _build(fmt, int8, run, wrapper, pixels, tmp)
        reference, outputs = _outputs(wrapper, pixels), _outputs(candidate, pixels)
        check = compare(reference, outputs, labels, run.thresholds)
        if reason := check.failure(int8):
            hint = "; the fp32 export (without --int8) keeps PyTorch's predictions" if int8 else ""
            raise UserError(f"export refused, nothing written: {reason} on {check.images} validation images{hint}")
        speeds = images_per_second([candidate, wrapper], pixels)
        if int8:
            probes = make_probes(pixels.numpy(), reference, outputs, run.thresholds)
            _set_metadata(tmp, {**export_metadata(run, int8), PROBES_KEY: probes})
    size_mb = target.stat().st_size / 2**20
    return ExportReport(str(target), fmt, int8, round(size_mb, 2), check, *speeds, notes=notes)


class OnnxPredictor:
    """A classifier from its .onnx file alone: classes and preprocessing come from the file's metadata.

    Offers Run's prediction methods, so a server or `predict` can use either without caring which."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._session = _Session(self.path)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for unreadable files
            raise UserError(f"cannot load {self.path}: {str(exc).splitlines()[0][:200]}") from None
        self.metadata: dict[str, str] = self._session.session.get_modelmeta().custom_metadata_map
        if "classes" not in self.metadata or "preprocessing" not in self.metadata:
            raise UserError(f"{self.path} is not a transferkit export (no classes/preprocessing in its metadata)")
        self.classes: list[str] = json.loads(self.metadata["classes"])
        self.preprocess = Preprocess.from_dict(json.loads(self.metadata["preprocessing"]))
        self.transform = pixel_transform(self.preprocess)
        self._pixels_of = pixel_batch(self.preprocess)
        self.box_margin = float(json.loads(self.metadata.get("box_margin", "0")))
        multi = self.metadata.get("task") == multilabel.TASK
        self.thresholds = multilabel.thresholds_of(json.loads(self.metadata["thresholds"]), self.classes) if multi \
            else None
        if self.metadata.get("quantization", "none") != "none" and (
                reason := probe_failure(self.metadata.get(PROBES_KEY), self._session, self.thresholds)):
            raise UserError(f"{self.path.name} is not safe to use here: {reason}")

    def probabilities(self, paths: list[str], crops: list[Box | None] | None = None) -> np.ndarray:
        """(N, classes) probabilities for image files, cropped to `crops` if given (decoded in workers when there
        are many)."""
        return _outputs(self._session, image_loader(paths, self.transform, BATCH_SIZE, crops))

    def probabilities_of_images(self, images: list[Image.Image]) -> np.ndarray:
        """(N, classes) probabilities for decoded RGB images already in memory (a server's batch: no PyTorch)."""
        return self._session(self._pixels_of(images))


PREDICT_ENGINES = ("auto", "int8", "onnx", "torch")
EXPORT_FILES = {"int8": "model.int8.onnx", "onnx": "model.onnx"}  # "auto" tries them in this order: fastest first


def load_predictor(run_dir: str | Path, engine: str = "auto") -> Run | OnnxPredictor:
    """"auto": the fastest export made from the run's current weights (int8, then fp32 ONNX), else PyTorch.

    An int8 export only exists if it passed its agreement and accuracy check, so preferring it is safe."""
    if engine not in PREDICT_ENGINES:
        raise UserError(f"unknown engine '{engine}': choose one of {', '.join(PREDICT_ENGINES)}")
    run_dir = Path(run_dir)
    if engine == "torch":
        return Run(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"no such run folder: {run_dir}")
    if engine != "auto":
        return _export_predictor(run_dir, engine)
    kinds = [kind for kind in EXPORT_FILES if (run_dir / EXPORT_FILES[kind]).is_file()]
    for position, kind in enumerate(kinds):
        try:
            return _export_predictor(run_dir, kind)
        except UserError as exc:
            fallback = EXPORT_FILES[kinds[position + 1]] if position + 1 < len(kinds) else "PyTorch"
            print_warning("warning:", f"{exc}; using {fallback} instead")
    return Run(run_dir)


def _export_predictor(run_dir: Path, kind: str) -> OnnxPredictor:
    path = run_dir / EXPORT_FILES[kind]
    if not path.is_file():
        flag = " --int8" if kind == "int8" else ""
        raise UserError(f"{run_dir} has no {path.name}: run `transferkit export {run_dir}{flag}` first, "
                        "or use --engine torch")
    predictor = OnnxPredictor(path)
    weights = run_dir / "model.safetensors"
    if weights.is_file() and predictor.metadata.get("weights_digest") not in (None, file_digest(weights)):
        raise UserError(f"{path} was exported from other weights: run `transferkit export {run_dir}` again")
    return predictor
