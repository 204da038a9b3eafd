"""Issue 19's fine-tuning options: mixup/CutMix with soft targets, class balance (weights, sampler), layer-wise
learning-rate decay, RandAugment, and the EMA of the weights; each repeatable, and resumed exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch.nn import functional as F

from tests.conftest import make_class_folders
from transferkit import api
from transferkit.config import resolve_config
from transferkit.data.loader import ImageDataset, Labelled
from transferkit.data.preprocess import Preprocess
from transferkit.data.transforms import eval_transform, train_transform
from transferkit.errors import UserError
from transferkit.models.classifier import new_classifier, unfreeze
from transferkit.options import AUGMENT_PRESETS, HeadSpec
from transferkit.task.kinds import Binary, MultiClass, MultiLabel
from transferkit.training.distributed import Ranks
from transferkit.training.ema import WeightAverage
from transferkit.training.mixing import mixed
from transferkit.training.optim import finetune_groups
from transferkit.training.optional import epoch_order
from transferkit.training.state import EpochLog, Scores
from transferkit.training.two_stage import indexed_batches

PRE = Preprocess(image_size=32, interpolation="bilinear", crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def one_batch(images: torch.Tensor, targets: torch.Tensor):
    return lambda epoch, skip: iter([(images.clone(), targets.clone())])


def test_mixup_targets_sum_to_one_and_are_the_mixed_one_hots() -> None:
    task, config = MultiClass(["a", "b", "c"]), resolve_config(mixup=0.4, seed=3)
    images, targets = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])  # odd: the last image stays itself
    [(mixed_images, soft)] = list(mixed(one_batch(images, targets), config, task)(1, 0))
    hot = F.one_hot(targets, 3).float()
    assert soft.shape == (5, 3) and torch.allclose(soft.sum(dim=1), torch.ones(5))
    lam = float(soft[1, 1])  # image 1 (class b) mixed with image 2 (class c): b = lam, c = 1 - lam
    assert 0 < lam < 1
    assert torch.allclose(soft[:4], lam * hot[:4] + (1 - lam) * hot[:4].flip(0))
    assert torch.allclose(mixed_images[:4], lam * images[:4] + (1 - lam) * images[:4].flip(0), atol=1e-6)
    assert torch.equal(mixed_images[4], images[4]) and torch.equal(soft[4], hot[4])
    [(again, _)] = list(mixed(one_batch(images, targets), config, task)(1, 0))
    [(other_epoch, _)] = list(mixed(one_batch(images, targets), config, task)(2, 0))
    assert torch.equal(again, mixed_images) and not torch.equal(other_epoch, mixed_images)  # seeded per batch
    [(untouched, hard)] = list(mixed(one_batch(images, targets), resolve_config(), task)(1, 0))  # off
    assert torch.equal(untouched, images) and torch.equal(hard, targets)


def test_multi_label_rows_are_mixed_label_by_label() -> None:
    rows = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    config = resolve_config(mixup=0.4, seed=1)
    [(_, soft)] = list(mixed(one_batch(torch.rand(4, 3, 8, 8), rows), config, MultiLabel(list("xyz")))(1, 0))
    lam = float(soft[0, 0])  # image 0 has label x, its partner (image 3) has not
    assert 0 < lam < 1 and torch.allclose(soft, lam * rows + (1 - lam) * rows.flip(0))


def test_soft_targets_for_every_kind_and_smoothing_applied_once() -> None:
    logits, soft = torch.randn(6, 3), torch.softmax(torch.randn(6, 3), dim=1)
    assert MultiClass(list("abc")).loss()(logits, soft) == pytest.approx(float(SoftTargetCrossEntropy()(logits, soft)))
    # smoothing in the loss equals timm's Mixup smoothing the targets (it commutes with mixing)
    targets = torch.tensor([0, 1, 2, 2, 1, 0])
    timm_smoothed = Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=3)
    np.random.seed(0)
    _, smoothed = timm_smoothed(torch.rand(6, 3, 4, 4), targets)
    np.random.seed(0)
    _, plain = Mixup(mixup_alpha=1.0, label_smoothing=0.0, num_classes=3)(torch.rand(6, 3, 4, 4), targets)
    ours = MultiClass(list("abc")).loss(label_smoothing=0.1)(logits, plain)
    assert ours == pytest.approx(float(SoftTargetCrossEntropy()(logits, smoothed)), abs=1e-6)
    # one logit: a soft row's second column is the BCE target
    one = torch.randn(6, 1)
    assert Binary(["n", "y"]).loss()(one, soft[:, :2] / soft[:, :2].sum(1, keepdim=True)) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(one[:, 0], soft[:, 1] / soft[:, :2].sum(1))))
    # hits of soft targets: the argmax of the target
    assert MultiClass(list("abc")).hits(logits, soft).tolist() == (logits.argmax(1) == soft.argmax(1)).float().tolist()
    assert Binary(["n", "y"]).hits(torch.tensor([[2.0], [-1.0]]), torch.tensor([[0.3, 0.7], [0.2, 0.8]])).tolist() == [
        1.0, 0.0]


def test_class_weights_are_inverse_frequency_and_weigh_each_kind() -> None:
    targets = torch.tensor([0] * 30 + [1] * 6)
    weights = MultiClass(["a", "b"]).class_weights(targets)
    assert weights.tolist() == pytest.approx([36 / 60, 36 / 12])  # n / (classes * n_c)
    logits = torch.randn(36, 2)
    assert MultiClass(["a", "b"]).loss(class_weights=weights)(logits, targets) == pytest.approx(
        float(F.cross_entropy(logits, targets, weight=weights)))
    one = torch.randn(36, 1)
    p = torch.sigmoid(one[:, 0])
    manual = -(weights[1] * targets * p.log() + weights[0] * (1 - targets) * (1 - p).log()).mean()
    assert Binary(["a", "b"]).loss(class_weights=weights)(one, targets) == pytest.approx(float(manual), rel=1e-5)
    multi = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assert MultiLabel(["x", "y"]).class_weights(multi).tolist() == [1.0, 3.0]  # negatives / positives per label


def test_balanced_sampler_draws_classes_evenly_and_repeatably(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "skewed", classes=1, per_class=30)
    make_class_folders(tmp_path / "rare", classes=2, per_class=6, seed=1)
    paths = sorted(map(str, (tmp_path / "skewed" / "class_0").glob("*.png")))
    paths += sorted(map(str, (tmp_path / "rare" / "class_1").glob("*.png")))
    train = Labelled(paths, torch.tensor([0] * 30 + [1] * 6))
    config = resolve_config(class_balance="sampler", batch_size=12, workers=0, seed=5)
    batches, steps = indexed_batches(train, eval_transform(PRE), config, Ranks())
    drawn = torch.cat([targets for epoch in range(1, 11) for _, targets in batches(epoch, 0)])
    assert steps == 3 and len(drawn) == 360
    assert abs(int((drawn == 1).sum()) - 180) < 40  # even within tolerance (a plain shuffle gives 60)
    first = torch.cat([t for _, t in batches(1, 0)])
    assert torch.equal(first, torch.cat([t for _, t in batches(1, 0)]))  # the epoch's seed decides
    shuffled = epoch_order(train.targets, "none", torch.Generator().manual_seed(0))
    assert sorted(shuffled.tolist()) == list(range(36))  # off: a permutation, as before


def test_layer_decay_gives_the_top_block_the_largest_rate() -> None:
    torch.manual_seed(0)
    model = new_classifier(timm.create_model("test_efficientnet", num_classes=0), 3, HeadSpec())
    params = unfreeze(model, "all")
    config = resolve_config(layer_decay=0.5, finetune_lr=1.0, backbone_lr_mult=0.1)
    groups = finetune_groups(model, params, config)
    names = {id(p): n for n, p in model.named_parameters()}
    rate = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert sorted(rate) == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # each exactly once
    assert rate["head.0.weight"] == 1.0 and rate["backbone.conv_head.weight"] == pytest.approx(0.1)
    # timm's layers of test_efficientnet: stem, blocks 0..3, then block 4 with the head convolution on top
    blocks = sorted({int(n.split(".")[2]) for n in rate if n.startswith("backbone.blocks.")})
    tops = [max(r for n, r in rate.items() if n.startswith(f"backbone.blocks.{b}.")) for b in blocks]
    assert tops == pytest.approx([0.1 * 0.5**k for k in range(len(blocks) - 1, -1, -1)])  # the top largest
    assert rate["backbone.conv_stem.weight"] == min(rate.values()) == pytest.approx(0.1 * 0.5 ** len(blocks))
    plain = finetune_groups(model, params, resolve_config(finetune_lr=1.0, backbone_lr_mult=0.1))
    assert [g["lr"] for g in plain] == [1.0, pytest.approx(0.1)]  # 1.0: today's two groups


def test_randaugment_changes_images_and_repeats_for_the_same_seed(tmp_path: Path) -> None:
    folder = make_class_folders(tmp_path / "d", classes=1, per_class=1)
    path = str(next(folder.glob("*/*.png")))
    transform = train_transform(PRE, AUGMENT_PRESETS["randaugment"])
    views = ImageDataset([path] * 4, [0] * 4, transform, seeds=[7, 7, 8, 9])
    a, b, c, d = (views[i][0] for i in range(4))
    assert torch.equal(a, b) and not (torch.equal(a, c) and torch.equal(a, d))
    assert not torch.equal(a, eval_transform(PRE)(Image.open(path).convert("RGB")))
    import random
    after = []
    for index in (0, 2):  # seeds 7 and 8
        random.seed(0)
        views[index]
        after.append(random.getstate())
    assert after[0] == after[1]  # the per-image seed does not leak into the global RNGs (decision 0291)


def test_bad_option_values_are_user_errors() -> None:
    for values in ({"ema_decay": 1.0}, {"layer_decay": 0.0}, {"mixup": -0.1}, {"class_balance": "auto"},
                   {"augment_options": {"policy": "rand-x9"}}):
        with pytest.raises(UserError, match="bad configuration"):
            resolve_config(**values)


class FakeStage(SimpleNamespace):
    def validate(self) -> Scores:  # the closer the weight is to 1, the lower the loss
        return Scores(float((self.model.weight.detach() - 1).abs().sum()), 0.5, 0.5)


def test_ema_is_offered_to_the_keeper_only_when_better_on_validation() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    keeper = SimpleNamespace(monitor="val_loss")
    stage = FakeStage(name="finetune", model=model, epochs=3, scheduler=SimpleNamespace(last_epoch=1))
    trainer = SimpleNamespace(model=model, stage=stage, keeper=keeper, stop_stage=False, candidate=None,
                              reporter=SimpleNamespace(log=lambda text: None))
    average = WeightAverage(0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.before_stage(trainer, stage)
    with torch.no_grad():
        model.weight.fill_(3.0)  # the live weights moved away: the average (at 1) is better
    log = EpochLog(1, "finetune", 0.1, 0.5, stage.validate().loss, 0.5, 1e-3, 1.0)
    average.after_epoch(trainer, log)
    assert log.weights == "ema" and log.val_loss == 0.0 and trainer.candidate is average.ema.module
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))  # the live weights are back after its validation
    average.after_batch(trainer, SimpleNamespace(stepped=True))  # step 1 of timm's schedule: a copy
    trainer.candidate, live = None, EpochLog(2, "finetune", 0.1, 0.5, 0.0, 0.5, 1e-3, 1.0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.after_epoch(trainer, live)  # the live weights (loss 0) beat the average (at 3)
    assert live.weights == "live" and live.val_loss == 0.0 and trainer.candidate is None
    assert torch.equal(average.state_dict()["weight"], torch.full((1, 2), 3.0))


EVERY_OPTION = {"ema_decay": 0.9, "layer_decay": 0.8, "mixup": 0.4, "cutmix": 1.0, "augment": "randaugment",
                "class_balance": "sampler"}


def test_a_run_with_every_option_resumed_mid_fine_tuning_ends_as_the_uninterrupted_one(
        dataset: Path, tmp_path: Path, fast: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_resume import Crash, RaiseAtBatch, history

    # the average always wins (its own validation, less 10), so history.csv shows whether it resumed exactly
    validate = WeightAverage._validate_average

    def average_wins(self: WeightAverage, trainer) -> Scores:
        scores = validate(self, trainer)
        return dataclasses.replace(scores, loss=scores.loss - 10)

    monkeypatch.setattr(WeightAverage, "_validate_average", average_wins)
    options = {**fast, "epochs_frozen": 3, "epochs_finetune": 2, "unfreeze": "all", "checkpoint_every": 1,
               "patience": 0, **EVERY_OPTION}
    straight = api.train(dataset, tmp_path / "straight", **options)
    with pytest.raises(Crash):  # 3 batches per epoch: stage 2 is calls 10-15; 14 is mid second epoch, after an EMA
        api.train(dataset, tmp_path / "crashed", callbacks=[RaiseAtBatch(14, Crash)], **options)  # decision
    resumed = api.resume(tmp_path / "crashed")
    assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], abs=1e-5)
    rows = history(tmp_path / "crashed")
    weights = rows[0].index("weights")
    assert rows == history(tmp_path / "straight")
    assert [row[weights] for row in rows[1:] if row[1] == "finetune"] == ["ema", "ema"]


def test_mixup_and_class_weights_train_a_one_logit_task(binary_dataset: Path, tmp_path: Path, fast: dict) -> None:
    run = api.train(binary_dataset, tmp_path / "run", **{**fast, "mixup": 0.4, "class_balance": "weights",
                                                         "label_smoothing": 0.1})
    assert run.meta["task"] == "binary" and np.isfinite(run.metrics["loss"])


def test_sampler_on_multi_label_data_is_refused_before_training(tmp_path: Path, fast: dict) -> None:
    from tests.test_multilabel import multilabel_csv

    with pytest.raises(UserError, match="multi-label"):
        api.train(multilabel_csv(tmp_path / "d", per_combination=4), tmp_path / "run",
                  **{**fast, "class_balance": "sampler"})
    assert len((tmp_path / "run" / "history.csv").read_text().splitlines()) == 1  # its header: no epoch trained


def test_the_soup_takes_the_weights_the_epoch_was_validated_with() -> None:
    from transferkit.training.soup import GreedySoup

    live, average = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        live.weight.fill_(3.0)
        average.weight.fill_(1.0)
    trainer = SimpleNamespace(model=live, candidate=average, keeper=SimpleNamespace(monitor="val_loss"),
                              stop_stage=False, stage=SimpleNamespace(epochs=5))
    soup = GreedySoup(2)
    soup.after_epoch(trainer, EpochLog(1, "finetune", 0.1, 0.5, 0.2, 0.5, 1e-3, 1.0, "ema"))
    [(_, _, state)] = soup.candidates
    assert torch.equal(state["weight"], torch.full((1, 2), 1.0))  # the EMA's, whose validation the log holds
