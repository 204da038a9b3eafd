"""Greedy soup of fine-tuning epochs (config `soup`): the averaging itself, the greedy rule on a model whose
validation score is known in closed form, and a tiny real run (meta.json's record, resume mid fine-tuning)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from transferkit import api
from transferkit.errors import UserError
from transferkit.training.callbacks import PauseAfter
from transferkit.training.soup import GreedySoup, average_states, trainable_keys
from transferkit.training.state import BestKeeper, EpochLog, Scores


def test_average_states_means_floats_and_keeps_the_first_counter():
    a, b = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([1.0, 2.0]))
        b.weight.copy_(torch.tensor([3.0, 6.0]))
    a.running_mean.copy_(torch.tensor([0.0, 4.0]))
    b.running_mean.copy_(torch.tensor([2.0, 0.0]))
    a.num_batches_tracked.fill_(7)
    b.num_batches_tracked.fill_(9)
    soup = average_states([a.state_dict(), b.state_dict()])
    assert soup["weight"].tolist() == [2.0, 4.0]
    assert soup["running_mean"].tolist() == [1.0, 2.0]  # BN statistics are averaged too, as model soups do
    assert soup["num_batches_tracked"].item() == 7 and soup["num_batches_tracked"].dtype == torch.long


def test_trainable_keys_are_the_unfrozen_modules_with_their_buffers():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    assert set(trainable_keys(model)) == {"1.weight", "1.bias", "1.running_mean", "1.running_var",
                                          "1.num_batches_tracked", "3.weight", "3.bias"}


def soup_of(weights: list[float], size: int = 3) -> tuple[SimpleNamespace, GreedySoup]:
    """Fine-tuning epochs whose single weight is `weights[e]`; validation loss is |w - 1| (accuracy 0.5)."""
    model = nn.Linear(1, 1, bias=False)
    keeper = BestKeeper("val_loss", patience=0)
    validate = lambda: Scores(abs(model.weight.item() - 1.0), 0.5, 0.5)  # noqa: E731
    trainer = SimpleNamespace(model=model, keeper=keeper, stop_stage=False, records={}, candidate=None,
                              reporter=SimpleNamespace(log=lambda _: None),
                              stage=SimpleNamespace(validate=validate, epochs=len(weights)))
    soup = GreedySoup(size)
    for epoch, w in enumerate(weights, start=1):
        with torch.no_grad():
            model.weight.fill_(w)
        log = EpochLog(epoch, "finetune", 0.1, 1.0, abs(w - 1.0), 0.5, 1e-3, 0.1)
        keeper.update(log, model)  # what EarlyStopping does before the soup sees the epoch
        soup.after_epoch(trainer, log)
    return trainer, soup


def test_a_soup_that_validates_better_is_kept():
    trainer, _ = soup_of([0.5, 1.5, 4.0])  # 0.5 and 1.5 average to 1.0: loss 0; adding 4.0 would make it worse
    record = trainer.records["soup"]
    assert record["members"] == [1, 2] and record["candidates"] == [1, 2, 3] and record["kept"]
    assert record["best_epoch"] == pytest.approx(0.5) and record["soup"] == pytest.approx(0.0)
    assert trainer.model.weight.item() == pytest.approx(1.0)
    assert trainer.keeper.best == pytest.approx(0.0)


def test_a_soup_that_validates_worse_is_not_kept():
    trainer, _ = soup_of([1.0, 3.0, -1.0])  # each average moves away from 1.0
    record = trainer.records["soup"]
    assert record["members"] == [1] and not record["kept"]
    assert trainer.model.weight.item() == pytest.approx(1.0)  # the best single epoch's weights
    assert trainer.keeper.best == 0.0


def test_only_the_best_n_epochs_are_candidates():
    trainer, _ = soup_of([0.0, 0.9, 1.2, 5.0], size=2)
    assert trainer.records["soup"]["candidates"] == [2, 3]


def test_soup_must_be_at_least_two(dataset, fast):
    with pytest.raises(UserError, match="soup must be 0"):
        api.train(dataset, dataset.parent / "run", soup=1, **fast)


def test_tiny_run_records_its_soup_and_resume_keeps_the_earlier_epochs(dataset, fast, tmp_path):
    options = {**fast, "epochs_finetune": 3, "patience": 0, "soup": 3}
    straight = api.train(dataset, tmp_path / "straight", **options)
    record = straight.meta["soup"]
    assert record["candidates"] == [1, 2, 3] and record["monitor"] == "val_loss"
    assert record["members"] and set(record["members"]) <= {1, 2, 3}
    if record["kept"]:
        assert record["soup"] <= record["best_epoch"] and straight.meta["kept"]["value"] == pytest.approx(
            record["soup"])
    # paused after fine-tuning epoch 1 (auto's race does this), then resumed: epoch 1 is still a candidate
    assert api.train(dataset, tmp_path / "paused", callbacks=[PauseAfter(1)], **options) is None
    resumed = api.resume(tmp_path / "paused")
    assert resumed.meta["soup"] == record
    saved = json.loads((tmp_path / "paused" / "meta.json").read_text())
    assert saved["soup"]["candidates"] == [1, 2, 3]
