"""Greedy soup of fine-tuning checkpoints (Wortsman et al., 2022, "Model soups"): the trainable part's weights of
the best `soup` fine-tuning epochs, sorted by the monitored validation score, are averaged one by one into a soup
that keeps an ingredient only if validation does not get worse; the soup replaces the kept weights only if it is
at least as good as the best single epoch. Decision 0275.

Only the fine-tuned part is kept per epoch (the unfrozen blocks and the head, batch-norm statistics included):
the frozen lower blocks are the same in every epoch, so memory stays at N copies of what trains.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from transferkit.config import TrainConfig
from transferkit.options import as_loss
from transferkit.training.callbacks import Callback
from transferkit.training.state import EpochLog

if TYPE_CHECKING:
    from transferkit.training.trainer import Trainer

STAGE = "finetune"


def soup_callbacks(config: TrainConfig) -> list[Callback]:
    """What `soup` asks the Trainer for (nothing when it is 0)."""
    return [GreedySoup(config.soup)] if config.soup else []


def trainable_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every module with a trainable parameter of its own: its parameters and buffers (a
    fine-tuned batch-norm layer's running statistics belong with its weights)."""
    keys = []
    for prefix, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            names = [name for name, _ in module.named_parameters(recurse=False)]
            names += [name for name, _ in module.named_buffers(recurse=False)]
            keys += [f"{prefix}.{name}" if prefix else name for name in names]
    return keys


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of state dicts (floating tensors); counters such as BN's num_batches_tracked are the
    first state's: an average of step counts means nothing."""
    first = states[0]
    return {key: torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
            if value.is_floating_point() else value.clone() for key, value in first.items()}


class GreedySoup(Callback):
    """Keeps the best `size` fine-tuning epochs' trainable weights; as the stage ends (before its last checkpoint,
    so a resumed run finds the result) builds the greedy soup and hands it to the keeper if it is no worse."""

    order = 15  # after EarlyStopping (10) has decided the epoch, before Checkpointing (20) saves it

    def __init__(self, size: int) -> None:
        self.size = size
        self.candidates: list[tuple[float, int, dict]] = []  # (score, lower is better; epoch; state), best first
        self.record: dict | None = None  # meta.json's `soup`, once made

    def after_epoch(self, trainer: Trainer, log: EpochLog) -> None:
        if log.stage != STAGE or trainer.stage is None:
            return
        if math.isfinite(log.train_loss) and math.isfinite(log.val_loss):
            self._offer(trainer, log)
        if trainer.stop_stage or log.epoch == trainer.stage.epochs:
            self._build(trainer)

    def _offer(self, trainer: Trainer, log: EpochLog) -> None:
        keys = trainable_keys(trainer.model)
        # the weights the log's validation is of: the EMA's when they won the epoch (training.ema)
        full = (trainer.model if trainer.candidate is None else trainer.candidate).state_dict()
        state = {key: full[key].detach().to("cpu", copy=True) for key in keys}
        self.candidates.append((score(trainer, getattr(log, trainer.keeper.monitor)), log.epoch, state))
        self.candidates = sorted(self.candidates, key=lambda c: (c[0], c[1]))[: self.size]

    def _build(self, trainer: Trainer) -> None:
        """Greedy: best epoch first, each next one joins if the average's validation score does not drop."""
        if len(self.candidates) < 2:
            return
        model, keeper, validate = trainer.model, trainer.keeper, trainer.stage.validate
        base = {**keeper.best_state} if keeper.best_state is not None else model.state_dict()
        (best_score, best_epoch, best_state), *rest = self.candidates
        members, states, current = [best_epoch], [best_state], best_score
        for _, epoch, state in rest:
            trial = average_states([*states, state])
            model.load_state_dict({**base, **trial})
            tried = score(trainer, validate().of(keeper.monitor))
            if tried <= current:
                members, states, current = [*members, epoch], [*states, state], tried
        kept = len(members) > 1 and keeper.best is not None and current <= score(trainer, keeper.best)
        if kept:  # the keeper's weights are what early stopping restores, checkpoints carry and the run saves
            keeper.best = score(trainer, current)  # back to the monitor's own sign
            keeper.best_state = {**base, **average_states(states)}
        keeper.restore(model)
        self._record(trainer, members, best_score, current, kept)

    def _record(self, trainer: Trainer, members: list[int], best: float, soup: float, kept: bool) -> None:
        monitor = trainer.keeper.monitor
        record = {"candidates": sorted(c[1] for c in self.candidates), "members": sorted(members),
                  "monitor": monitor, "best_epoch": round(score(trainer, best), 6),
                  "soup": round(score(trainer, soup), 6), "kept": kept}
        self.record = trainer.records["soup"] = record
        verdict = "kept" if kept else "not kept (the best single epoch stays)"
        trainer.reporter.log(f"greedy soup of fine-tuning epochs {record['members']} (of {record['candidates']}): "
                             f"{monitor} {record['soup']:.4f} vs best epoch {record['best_epoch']:.4f}: {verdict}")
        self.candidates = []  # the soup is made; nothing more to carry in checkpoints

    def state_dict(self) -> dict:
        """Checkpoints carry the candidates (a resumed run soups the epochs from before the crash too) and the
        record (a run resumed after the soup was made still writes it into meta.json)."""
        return {"candidates": self.candidates, "record": self.record}

    def load_state_dict(self, trainer: Trainer, state: dict) -> None:
        self.candidates = [tuple(c) for c in state["candidates"]]
        self.record = state["record"]
        if self.record is not None:
            trainer.records["soup"] = self.record


def score(trainer: Trainer, value: float) -> float:
    """The monitored value made lower-is-better."""
    return as_loss(value, trainer.keeper.monitor)
