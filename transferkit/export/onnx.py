"""Ship a run: export its classifier to ONNX (fp32 or int8) or TorchScript (`transferkit.predictor` predicts from
the export alone).

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
from torch import nn

import transferkit
from transferkit.data.content import file_digest
from transferkit.errors import UserError
from transferkit.export.check import validation_images
from transferkit.fileio import atomic_path
from transferkit.models.classifier import evaluate_logits
from transferkit.models.tta import tta_logits
from transferkit.options import check_export_choice
from transferkit.parity import PROBES_KEY, Check, compare, make_probes
from transferkit.prediction import ENSEMBLE, ensemble_members
from transferkit.predictor import ENSEMBLE_EXPORTS, EXPORT_FILES, OnnxSession
from transferkit.runs.files import write_json
from transferkit.runs.run import Run

CALIBRATION_IMAGES = 256  # int8 ranges settle long before this; more only costs export time
TIMING_IMAGES = 64
BATCH_SIZE = 32


class ProbabilityModel(nn.Module):
    """The run's classifier with its input and output contract baked in: [0, 1] pixels in, probabilities out, with
    the run's test-time views batched inside the graph and its calibrating temperature dividing the logits."""

    def __init__(self, run: Run) -> None:
        super().__init__()
        self.model = run.model  # not wrapped: int8 export tells the classifier's nodes by their "/model/" names
        self.task = run.task
        self.tta, self.temperature = run.tta, run.temperature
        self.samplewise_center = bool(run.meta.get("samplewise_center", False))
        self.register_buffer("mean", torch.tensor(run.preprocess.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(run.preprocess.std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = (pixels - self.mean) / self.std  # the same arithmetic as eval_transform's Normalize
        if self.samplewise_center:
            images = images - images.mean(dim=(1, 2, 3), keepdim=True)
        return self.task.probabilities(tta_logits(self.model, images, self.tta), self.temperature)


Engine = nn.Module | OnnxSession
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
    members: int = 0  # an ensemble's: `path` is its JSON description, `size_mb` its members' model files together


def default_out(run_dir: Path, fmt: str, int8: bool) -> Path:
    return run_dir / ("model.pt" if fmt == "torchscript" else "model.int8.onnx" if int8 else "model.onnx")


def export_metadata(run: Run, int8: bool) -> dict[str, str | list | dict]:
    """What a consumer of the file alone needs: classes and preprocessing (and a multi-label run's thresholds and
    a boxed run's margin), plus provenance (weights digest)."""
    extra = {key: run.meta[key] for key in ("thresholds", "box_margin", "threshold", "operating_point")
             if run.meta.get(key) is not None}
    if run.multilabel:
        extra["output"] = "per-label sigmoid probabilities (N, labels); a label applies at or above its threshold"
    elif run.threshold is not None:
        extra["output"] = "class probabilities (N, 2); the second class applies at or above `threshold`"
    return {
        "classes": run.classes,
        "preprocessing": run.preprocess.to_dict(),
        "task": run.meta["task"],
        "backbone": run.meta["backbone"],
        "transferkit_version": transferkit.__version__,
        "weights_digest": file_digest(run.path / "model.safetensors"),
        "quantization": "int8 static QDQ, per-channel weights" if int8 else "none",
        "input": "float32 NCHW RGB pixels in [0, 1], resized and centre-cropped as in preprocessing",
        "preprocessing_rule": run.preprocess.rule(),
        "output": "class probabilities (N, classes)",
        "tta": run.tta,  # inside the graph already: recorded, not to be applied again
        "temperature": run.temperature,  # likewise
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
    return OnnxSession(tmp)


def export_run(run_dir: str | Path, fmt: str = "onnx", int8: bool = False, out: str | Path | None = None,
               log: Callable[[str], None] = lambda _: None) -> ExportReport:
    """Export, check against eager PyTorch on the validation images, and only then move the file to `out`."""
    check_export_choice(fmt, int8)
    if (members := ensemble_members(Path(run_dir))) is not None:
        return export_ensemble(Path(run_dir), members, fmt, int8, out, log)
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
        check = compare(reference, outputs, labels, run.thresholds, run.threshold)
        if reason := check.failure(int8):
            hint = (f"; this model does not quantise well: `transferkit export {run.path}` (fp32, no --int8) keeps "
                    "PyTorch's predictions, then predict with --engine onnx") if int8 else ""
            raise UserError(f"export refused, nothing written: {reason} on {check.images} validation images{hint}")
        speeds = images_per_second([candidate, wrapper], pixels)
        if int8:
            probes = make_probes(pixels.numpy(), reference, outputs, run.thresholds, run.threshold)
            _set_metadata(tmp, {**export_metadata(run, int8), PROBES_KEY: probes})
    size_mb = target.stat().st_size / 2**20
    return ExportReport(str(target), fmt, int8, round(size_mb, 2), check, *speeds, notes=notes)


def export_ensemble(run_dir: Path, members: list[tuple[Path, float]], fmt: str, int8: bool, out: str | Path | None,
                    log: Callable[[str], None]) -> ExportReport:
    """Each member exported into its own run folder (and checked, as any export), then RUN/ensemble[.int8].json,
    which names and weighs them: `transferkit.predictor.EnsemblePredictor` averages them without PyTorch. The
    report's check is the member's that strayed furthest from PyTorch; its speed, the members' one after another."""
    if fmt != "onnx":
        raise UserError(f"{run_dir} is an ensemble: it exports to ONNX only (one file per member), not {fmt}")
    if out is not None:
        raise UserError(f"{run_dir} is an ensemble: its exports go into its member folders; drop --out")
    reports = []
    for folder, _ in members:
        log(f"member {folder.name}:")
        reports.append(export_run(folder, fmt, int8, None, log))
    kind = "int8" if int8 else "onnx"
    meta = json.loads((run_dir / "meta.json").read_text())
    path = run_dir / ENSEMBLE_EXPORTS[kind]
    write_json(path, {
        "classes": meta["classes"], "task": meta["task"], "threshold": meta.get("threshold"), "engine": kind,
        "members": [{"run": str(folder.relative_to(run_dir)), "file": EXPORT_FILES[kind], "weight": weight}
                    for folder, weight in members],
        "output": "the weighted average of the members' probabilities (N, classes)",
        "transferkit_version": transferkit.__version__, "ensemble": meta[ENSEMBLE]["members"],
    })
    worst = max(reports, key=lambda r: r.check.max_abs_diff)
    notes = [f"{r.path}: max |dprob| {r.check.max_abs_diff:.1e}" for r in reports]
    return ExportReport(str(path), fmt, int8, round(sum(r.size_mb for r in reports), 2), worst.check,
                        1 / sum(1 / r.export_img_s for r in reports), 1 / sum(1 / r.eager_img_s for r in reports),
                        notes=[note for r in reports for note in r.notes] + notes, members=len(reports))
