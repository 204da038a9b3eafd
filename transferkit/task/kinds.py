"""The one place that knows what a classifier's outputs mean: single-label softmax, binary with one logit, or
multi-label with a sigmoid per label. Each Task turns logits into a loss, probabilities, decisions and per-image
hits; training, evaluation, prediction, export and serving all ask it rather than deciding again.

torch is imported only by the methods that take tensors, so prediction from an export uses a Task without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from transferkit.task import multilabel

if TYPE_CHECKING:
    import torch

Loss = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


class Task:
    """What the logits of a run mean. `kind` is meta.json's `task` entry."""

    kind: ClassVar[str]

    def __init__(self, classes: list[str]) -> None:
        self.classes = list(classes)

    @property
    def outputs(self) -> int:
        """Width of the head's last layer."""
        return len(self.classes)

    @property
    def binary(self) -> bool:
        return self.kind == "binary"

    @property
    def multilabel(self) -> bool:
        return self.kind == multilabel.TASK

    def meta(self) -> dict:
        """meta.json's entries for the task, which `task_of` reads back."""
        kind = self.kind if self.multilabel else "binary" if len(self.classes) == 2 else "multiclass"
        return {"classes": self.classes, "task": kind, "binary_logit": self.binary}

    def loss(self, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> Loss:
        """The training loss of (logits, targets): targets are class indices (multi-hot rows for multi-label) or soft
        (N, classes) rows such as mixup's, both smoothed by `label_smoothing` (smoothing commutes with mixing, so
        mixed targets are smoothed once, here). `class_weights` (C,): each class's weight (`class_weights`)."""
        raise NotImplementedError

    def class_weights(self, targets: torch.Tensor) -> torch.Tensor:
        """Inverse-frequency weights of the training `targets`, n / (classes * n_c) as scikit-learn's 'balanced'
        (a class absent from training counts as one image)."""
        import torch

        counts = torch.bincount(targets, minlength=len(self.classes)).clamp(min=1).float()
        return len(targets) / (len(self.classes) * counts)

    def probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """(N, C) per-class probabilities for every kind, so everything downstream is kind-agnostic; `temperature`
        (the run's calibration) divides every logit."""
        raise NotImplementedError

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(N,) how right each image's prediction is, 1 or 0 (multi-label: the fraction of its labels right); a soft
        target row counts as its largest class."""
        return (self.predicted(logits) == target_classes(targets)).float()

    def predicted(self, logits: torch.Tensor) -> torch.Tensor:
        """Each image's predicted class index (single-label kinds)."""
        return logits.argmax(dim=1)

    def balanced_accuracy(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """The mean over the classes present in `targets` of the fraction of their images predicted right
        (scikit-learn's balanced_accuracy_score); multi-label: the mean over labels of the same, on each label's
        two outcomes."""
        hits, classes = self.hits(logits, targets), target_classes(targets)
        present = classes.unique()
        return float(sum(hits[classes == c].mean() for c in present) / len(present))

    def scores(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(N,) the logit that rises with each image's target class (what Grad-CAM differentiates)."""
        return logits.gather(1, targets[:, None].long())[:, 0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.classes)} classes)"


class MultiClass(Task):
    kind = "multiclass"

    def loss(self, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> Loss:
        from torch.nn import functional as F

        # torch's cross entropy takes class indices or probability rows (then equal to timm's
        # SoftTargetCrossEntropy), with class weights for both, which SoftTargetCrossEntropy has not
        def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            weight = None if class_weights is None else class_weights.to(logits.device)
            return F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing)

        return cross_entropy

    def probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        import torch

        return torch.softmax(logits.float() / temperature, dim=1)

    def logits_of(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Logits whose probabilities at temperature 1 are these (an ensemble's averaged probabilities)."""
        return probabilities.float().clamp_min(1e-12).log()


class Binary(Task):
    """Two classes, one logit: logit > 0 means the second class."""

    kind = "binary"

    @property
    def outputs(self) -> int:
        return 1

    def loss(self, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> Loss:
        from torch.nn import functional as F

        def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            positive = targets[:, 1] if targets.dim() == 2 else targets  # a soft row: p(second class)
            soft = positive.float() * (1 - label_smoothing) + 0.5 * label_smoothing
            if class_weights is None:
                return F.binary_cross_entropy_with_logits(logits[:, 0], soft)
            # w1 * p * log(s) + w0 * (1 - p) * log(1 - s): BCE with pos_weight w1 / w0, scaled by w0
            w0, w1 = class_weights.to(logits.device)
            return w0 * F.binary_cross_entropy_with_logits(logits[:, 0], soft, pos_weight=w1 / w0)

        return bce

    def probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        import torch

        p = torch.sigmoid(logits[:, 0].float() / temperature)
        return torch.stack([1 - p, p], dim=1)

    def logits_of(self, probabilities: torch.Tensor) -> torch.Tensor:
        return torch_logit(probabilities[:, 1:2])

    def predicted(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, 0] > 0).long()

    def scores(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.where(targets == 1, logits[:, 0], -logits[:, 0])  # the one logit means class 1


class MultiLabel(Task):
    """A sigmoid per label, each decided at its own threshold (task.multilabel)."""

    kind = multilabel.TASK

    def loss(self, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> Loss:
        return multilabel.loss(label_smoothing, class_weights)

    def class_weights(self, targets: torch.Tensor) -> torch.Tensor:
        """Each label's positive weight, negatives / positives (BCE's pos_weight), so a rare label's positives
        count as much as its negatives."""
        positives = targets.sum(dim=0).clamp(min=1)
        return (len(targets) - positives).clamp(min=1) / positives

    def probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        import torch

        return torch.sigmoid(logits.float() / temperature)

    def logits_of(self, probabilities: torch.Tensor) -> torch.Tensor:
        return torch_logit(probabilities)

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return multilabel.hits(logits, targets)

    def balanced_accuracy(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        return multilabel.balanced_accuracy(logits, targets)

    def predicted(self, logits: torch.Tensor) -> torch.Tensor:
        raise TypeError("a multi-label task decides each label at its threshold, not one class per image")


def target_classes(targets: torch.Tensor) -> torch.Tensor:
    """Each image's class index: a soft (N, classes) row such as mixup's counts as its largest class."""
    return targets.argmax(dim=1) if targets.dim() == 2 else targets


def torch_logit(p: torch.Tensor) -> torch.Tensor:
    """The inverse sigmoid, finite at 0 and 1."""
    import torch

    return torch.logit(p.float(), eps=1e-7)


def task_for(classes: list[str], is_multilabel: bool, one_logit_for_two: bool) -> Task:
    """The task of new training data: multi-label if its labels are sets, binary (one logit) for two classes when
    the config asks for it, else softmax."""
    if is_multilabel:
        return MultiLabel(classes)
    return Binary(classes) if one_logit_for_two and len(classes) == 2 else MultiClass(classes)


def task_of(meta: dict) -> Task:
    """A saved run's (or an export's) task, from its meta.json entries."""
    kinds = {kind.kind: kind for kind in (MultiClass, Binary, MultiLabel)}
    kind = meta.get("task", "multiclass")
    if kind == "binary" and len(meta["classes"]) != 2:
        raise ValueError(f"a binary task has 2 classes, not {len(meta['classes'])}")
    if kind == "binary" and not meta.get("binary_logit", True):
        kind = "multiclass"  # two classes through a softmax of two logits
    return kinds[kind](meta["classes"])

