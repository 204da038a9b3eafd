"""The run folder (a contract, see docs/design.md): writing it during training, loading it to predict and evaluate."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from transferkit.data.boxes import Box, crop_regions
from transferkit.data.loader import ImageDataset, make_loader, targets_of
from transferkit.data.sources import DatasetIndex, Sample, Skipped, scan_dataset
from transferkit.data.transforms import Preprocess, eval_transform
from transferkit.errors import UserError
from transferkit.models import tta
from transferkit.models.classifier import Classifier, HeadSpec, empty_classifier, evaluate_logits
from transferkit.models.device import resolve_device
from transferkit.prediction import collect_inputs, ensemble_members, prediction_records
from transferkit.runs.files import FORMAT_VERSION, read_history, write_json, write_predictions
from transferkit.runs.folder import RETRAIN, require_model_files
from transferkit.runs.scope import check_leaks, choose_scope, is_own_data, leak_record
from transferkit.task import multilabel
from transferkit.task.calibration import decide, expected_calibration_error
from transferkit.task.kinds import Task, task_of

KNOWN_SHOWN = 10  # the classes named when a folder holds others: enough to spot a renamed one


class Run:
    """A trained classifier loaded from its run folder alone (no pretrained weights, no training data needed)."""

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if ensemble_members(self.path) is not None:  # commands that take an ensemble open it with open_run
            raise UserError(f"{self.path} is an ensemble: this needs one model, e.g. {self.path / 'members'}/NAME")
        self.meta = require_model_files(self.path)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"run folder {self.path} has format_version {self.meta.get('format_version')}; "
                f"this transferkit reads {FORMAT_VERSION}"
            )
        try:
            self._describe_model()
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:  # a field missing or mistyped
            raise UserError(f"{meta_path} is damaged ({type(exc).__name__}: {exc}): {RETRAIN}") from None
        if self.tta not in tta.MODES:
            raise UserError(f"{meta_path} has an unknown tta '{self.tta}': expected one of {', '.join(tta.MODES)}")
        load_weights(self.model, self.path / "model.safetensors")
        self.model.eval().to(resolve_device(device), memory_format=torch.channels_last)
        self.inference = tta.Averaged(self.model, self.tta) if self.tta != "none" else self.model
        # the test-time views' logits without an eager pass (the feature engine: features.extract.head_logits)
        self.view_logits: Callable[[list[str], list[Box | None] | None, int], torch.Tensor] | None = None
        # and the clean view's pooled backbone features (the report's similarity heatmap reads them)
        self.plain_features: Callable[[list[str], list[Box | None] | None], torch.Tensor] | None = None
        self.metrics: dict | None = None

    def _describe_model(self) -> None:
        """The task, preprocessing and an empty classifier, as meta.json describes them."""
        self.classes: list[str] = list(self.meta["classes"])
        self.task: Task = task_of(self.meta)
        self.multilabel, self.binary = self.task.multilabel, self.task.binary
        self.thresholds = multilabel.thresholds_of(self.meta["thresholds"], self.classes) if self.multilabel else None
        self.box_margin: float = float(self.meta.get("box_margin", 0.0))
        self.preprocess = Preprocess.from_dict(self.meta)
        head = self.meta["head"]
        self.model: Classifier = empty_classifier(
            self.meta["timm_name"],
            self.task.outputs,
            HeadSpec(tuple(head["hidden"]), head["dropout"], head["batchnorm"]),
            self.meta.get("feature_depths", ()),
            self.meta.get("global_pool"),  # a run from before decision 0298 pools as its backbone does (avg)
        )
        self.transform = eval_transform(self.preprocess, bool(self.meta.get("samplewise_center", False)))
        # chosen on validation after training (transferkit.tuning); a run from before them has none
        self.tta: str = self.meta.get("tta", "none")
        self.temperature: float = float(self.meta.get("temperature", 1.0))
        threshold = self.meta.get("threshold")  # binary: p(second class) cut; None: the larger p
        self.threshold: float | None = None if threshold is None else float(threshold)

    @property
    def explained(self) -> Run:
        """The run whose model Grad-CAM explains: this one (an ensemble's: one member)."""
        return self

    def logits(self, paths: list[str], crops: list[Box | None] | None = None) -> torch.Tensor:
        """(N, logits) of image files (averaged over the run's test-time views), each cropped to its region in
        `crops` if given (decoded in workers when there are many)."""
        if self.view_logits is not None:
            return self.view_logits(paths, crops, tta.VIEWS[self.tta]).mean(dim=1)
        return infer_logits(self.inference, paths, self.transform, tta.images_per_batch(tta.VIEWS[self.tta]), crops)

    def to_probabilities(self, logits: torch.Tensor, calibrated: bool = True) -> np.ndarray:
        return self.task.probabilities(logits, self.temperature if calibrated else 1.0).numpy()

    def probabilities(self, paths: list[str], crops: list[Box | None] | None = None) -> np.ndarray:
        """(N, classes) calibrated probabilities for image files, each cropped to its region in `crops` if given."""
        return self.to_probabilities(self.logits(paths, crops))

    def probabilities_of_images(self, images: list[Image.Image]) -> np.ndarray:
        """(N, classes) probabilities for decoded RGB images already in memory (a server's uploads)."""
        batch = [(torch.stack([self.transform(i) for i in images]), torch.zeros(0))]
        return self.to_probabilities(evaluate_logits(self.inference, batch)[0])

    def predict(self, inputs: str | os.PathLike | Sequence[str | os.PathLike], top_k: int = 5
                ) -> tuple[list[dict], list[Skipped]]:
        """Labels and probabilities for images, folders of images or dataset CSVs (cropped to their boxes), one
        path or a list; unreadable files are skipped with a reason."""
        listed = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
        paths, boxes, skipped = collect_inputs([os.fspath(item) for item in listed])
        return (prediction_records(self, paths, boxes, top_k) if paths else []), skipped

    def evaluate(self, data: str | Path | DatasetIndex, split: str | None = None, write: bool = True,
                 drop_leaks: bool = False) -> dict:
        """Metrics on the data: one split of the run's own data (default: test if it has one, else val), every
        image of other data, or what `split` names ("all": every image). Images copied from training are counted
        (`leaked_from_train`, with the accuracy without them) and left out with `drop_leaks`. Writes
        metrics.json, predictions.csv and the figures into the run folder."""
        # Data to score need not be data to train on: one class of new photos, or an empty class folder, will do.
        index = data if isinstance(data, DatasetIndex) else scan_dataset(data, **self.meta["data_split"],
                                                                         trainable=False)
        own = is_own_data(self.path, index)
        scope = choose_scope(index, split, own)
        self._check_labels(index, scope.samples, scope.split)
        check_leaks(scope, index, self.path, own)
        samples = scope.samples
        paths, crops = [s.path for s in samples], crop_regions([s.box for s in samples], self.box_margin)
        begin = time.perf_counter()
        logits = self.logits(paths, crops)
        seconds = time.perf_counter() - begin
        probs = self.to_probabilities(logits)
        y_true = targets_of(samples, index.labels_of, self.classes, self.multilabel).numpy()
        kept = np.ones(len(samples), dtype=bool)
        if drop_leaks and scope.leaked:
            kept[scope.leaked] = False
            if not kept.any():
                raise UserError(f"every one of the {len(samples)} evaluated images is a copy of a training image: "
                                "nothing is left to score without them")
        metrics, predicted = self._score(y_true[kept], probs[kept])
        if not self.multilabel:
            uncalibrated = self.to_probabilities(logits[torch.from_numpy(kept)], False)
            metrics.update(ece_uncalibrated=expected_calibration_error(uncalibrated, y_true[kept]),
                           operating_point=self.meta.get("operating_point", "default"), threshold=self.threshold)
        metrics.update(temperature=self.temperature, tta=self.tta, tta_views=tta.VIEWS[self.tta],
                       seconds_per_image=seconds / len(paths))
        metrics.update(split=scope.split, split_note=scope.note, **leak_record(scope, kept, self._hits(y_true, probs)),
                       skipped_files=[{"path": s.path, "reason": s.reason} for s in index.skipped])
        if "kept" in self.meta:  # which epoch's weights these are
            metrics["kept"] = self.meta["kept"]
        if write:
            self.write_metrics(metrics)
            chosen = [s for s, keep in zip(samples, kept, strict=True) if keep]
            write_predictions(self.path / "predictions.csv", [s.path for s in chosen], [s.label for s in chosen],
                              predicted, probs[kept], self.classes, [c for c, k in zip(crops, kept, strict=True) if k]
                              if crops else None)
        self.metrics = metrics
        return metrics

    def _score(self, y_true: np.ndarray, probs: np.ndarray) -> tuple[dict, list[str]]:
        """Metrics and the predicted label(s) of each image."""
        if self.multilabel:
            metrics = multilabel.compute_metrics(y_true, probs, self.classes, self.thresholds)
            return metrics, multilabel.label_names(multilabel.decide(probs, self.thresholds), self.classes)
        from transferkit.runs.evaluate import compute_metrics  # scikit-learn, matplotlib: only evaluation needs them

        predicted = [self.classes[i] for i in decide(probs, self.threshold)]
        return compute_metrics(y_true, probs, self.classes, self.threshold), predicted

    def _hits(self, y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Whether each image is right: its top class, or (multi-label) exactly its label set."""
        if self.multilabel:
            return (multilabel.decide(probs, self.thresholds) == (y_true > 0.5)).all(axis=1)
        return decide(probs, self.threshold) == y_true

    def _check_labels(self, index: DatasetIndex, samples: list[Sample], split: str) -> None:
        """The data must be of this run's kind (multi-label or not), with only classes it knows, and not empty."""
        if index.multilabel and not self.multilabel:
            raise UserError(f"{index.root} has multi-label rows ('|' in labels) but this run is single-label")
        unknown = sorted({label for s in samples for label in index.labels_of(s)} - set(self.classes))
        if unknown:
            known = ", ".join(self.classes[:KNOWN_SHOWN]) + (", ..." if len(self.classes) > KNOWN_SHOWN else "")
            raise UserError(f"classes not known to this model: {', '.join(unknown)} (it knows {known}); "
                            "a folder per known class, or a CSV with their names, is what it can score")
        if not samples:
            raise UserError(f"the '{split}' split of {index.root} has no images")

    def write_metrics(self, metrics: dict) -> None:
        from transferkit.runs.evaluate import plot_confusion, plot_curves

        write_json(self.path / "metrics.json", metrics)
        if not self.multilabel:  # several labels per image: no single confusion matrix
            plot_confusion(metrics["confusion_matrix"], self.classes, self.path / "confusion.png")
        history_path = self.path / "history.csv"
        if history_path.is_file() and (history := read_history(history_path)):
            plot_curves(history, self.path / "curves.png", self.meta.get("kept"))


def open_run(path: str | Path, device: str = "auto") -> Run:
    """A run folder as a Run, or an ensemble run folder as an Ensemble (the same interface)."""
    if ensemble_members(Path(path)) is not None:
        from transferkit.runs.ensemble import Ensemble  # it builds on Run

        return Ensemble(path, device)
    return Run(path, device)


def image_loader(paths: list[str], transform, batch_size: int = 32, crops: list[Box | None] | None = None
                 ) -> DataLoader:
    """Inference batches of images (cropped to `crops`) in order, decoded in worker processes only when there are
    enough to pay for starting them."""
    workers = 2 if len(paths) >= 4 * batch_size else 0
    return make_loader(ImageDataset(paths, None, transform, crops=crops), batch_size, workers)


def infer_logits(model: torch.nn.Module, paths: list[str], transform, batch_size: int = 32,
                 crops: list[Box | None] | None = None) -> torch.Tensor:
    """Logits for a list of readable images, in order."""
    logits, _ = evaluate_logits(model, image_loader(paths, transform, batch_size, crops))
    return logits


def load_weights(model: Classifier, path: Path) -> None:
    """model.safetensors into `model`; one line when the file is damaged or holds another model's tensors."""
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path} is damaged ({exc}): {RETRAIN}") from None
    except RuntimeError:  # PyTorch's message lists every mismatched key: hundreds of lines
        raise UserError(f"{path} does not fit the model its meta.json describes (another run's weights, or an "
                        f"edited meta.json): {RETRAIN}") from None
