"""Two-stage training behaviour: what stage 1 must not touch, what stage 2 changes, best restore, repeatability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import balanced_accuracy_score

from transferkit import api
from transferkit.models.registry import load_weights_file
from transferkit.runs.files import read_history
from transferkit.runs.run import Run
from transferkit.task.kinds import MultiClass, MultiLabel
from transferkit.training.callbacks import Callback


def backbone_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return {
        k.removeprefix("backbone."): v
        for k, v in load_file(str(run_dir / "model.safetensors")).items()
        if k.startswith("backbone.")
    }


def test_stage1_leaves_backbone_weights_and_bn_statistics_untouched(dataset, tmp_path, fast, tiny_weights):
    run = api.train(dataset, tmp_path / "run", **{**fast, "epochs_finetune": 0, "epochs_frozen": 4})
    original = load_weights_file(tiny_weights)
    trained = backbone_state(run.path)
    assert trained, "the run saved no backbone weights"
    for key, value in trained.items():
        assert torch.equal(value, original[key]), f"stage 1 changed {key}"
    assert any("running_mean" in k for k in trained), "BN statistics must be part of what is compared"
    # Same seed, same initial head: if stage 1 never trained it, one epoch and four would save the same head.
    shorter = api.train(dataset, tmp_path / "shorter", **{**fast, "epochs_finetune": 0, "epochs_frozen": 1})
    heads = [{k: v for k, v in load_file(str(r.path / "model.safetensors")).items() if k.startswith("head.")}
             for r in (run, shorter)]
    assert heads[0] and heads[0].keys() == heads[1].keys()
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0]), "the head was not trained"


def test_stage2_unfreeze_top_blocks_changes_only_those(dataset, tmp_path, fast, tiny_weights):
    run = api.train(
        dataset,
        tmp_path / "run",
        **{
            **fast,
            "epochs_finetune": 1,
            "epochs_frozen": 0,
            "unfreeze": "1",
            "finetune_lr": 0.05,
            "backbone_lr_mult": 1.0,
        },
    )
    original = load_weights_file(tiny_weights)
    changed = {k for k, v in backbone_state(run.path).items() if not torch.equal(v, original[k])}
    assert changed, "fine-tuning the top block changed nothing"
    assert not any(k.startswith(("conv_stem", "bn1", "blocks.0")) for k in changed), f"lower layers moved: {changed}"
    # BN statistics stay in inference mode while fine-tuning (the default): no running stat moved.
    assert not any("running" in k for k in changed)


def test_stage2_unfreeze_all_changes_the_stem(dataset, tmp_path, fast, tiny_weights):
    run = api.train(
        dataset,
        tmp_path / "run",
        **{**fast, "epochs_frozen": 0, "unfreeze": "all", "finetune_lr": 0.05, "backbone_lr_mult": 1.0},
    )
    original = load_weights_file(tiny_weights)
    assert not torch.equal(backbone_state(run.path)["conv_stem.weight"], original["conv_stem.weight"])


def test_best_epoch_is_restored_when_fine_tuning_makes_it_worse(dataset, tmp_path, fast):
    # A huge fine-tuning learning rate wrecks the model; the saved model must be the best epoch's.
    run = api.train(
        dataset,
        tmp_path / "run",
        **{
            **fast,
            "epochs_frozen": 6,
            "epochs_finetune": 2,
            "finetune_lr": 50.0,
            "backbone_lr_mult": 1.0,
            "optimizer": "sgd",
            "patience": 0,
        },
    )
    history = read_history(run.path / "history.csv")
    best = min(row["val_loss"] for row in history)
    assert not history[-1]["val_loss"] <= best, "the test needs a last epoch worse than the best (or NaN)"
    run.temperature = 1.0  # the logits as trained: calibration lowers the loss below the training log's
    assert run.evaluate(dataset, split="val", write=False)["loss"] == pytest.approx(best, rel=1e-3, abs=1e-4)


def test_early_stopping_stops_a_stage(dataset, tmp_path, fast):
    run = api.train(
        dataset,
        tmp_path / "run",
        **{
            **fast,
            "epochs_frozen": 30,
            "epochs_finetune": 0,
            "patience": 2,
            "lr": 0.0001,
            "schedule": "constant",
            "monitor": "val_acc",
        },
    )
    assert len(read_history(run.path / "history.csv")) < 30


def test_same_seed_same_run(dataset, tmp_path, fast):
    options = {**fast, "augment": "light", "feature_views": 2, "seed": 7}
    first = api.train(dataset, tmp_path / "a", **options)
    second = api.train(dataset, tmp_path / "b", **options)
    assert first.metrics["loss"] == second.metrics["loss"]
    assert (tmp_path / "a" / "split.json").read_text() == (tmp_path / "b" / "split.json").read_text()
    a, b = load_file(str(first.path / "model.safetensors")), load_file(str(second.path / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_different_seed_different_split(dataset, tmp_path, fast):
    first = api.train(dataset, tmp_path / "a", **{**fast, "seed": 1})
    second = api.train(dataset, tmp_path / "b", **{**fast, "seed": 2})
    assert (
        json.loads((first.path / "split.json").read_text())["val"]
        != json.loads((second.path / "split.json").read_text())["val"]
    )


def test_binary_logit_sign_decides_the_class(binary_dataset, tmp_path, fast):
    run = api.train(binary_dataset, tmp_path / "run", **fast)
    assert run.model.head[-1].out_features == 1 and run.meta["task"] == "binary"
    paths = json.loads((run.path / "split.json").read_text())["val"]
    from transferkit.runs.run import infer_logits

    logits = infer_logits(run.model, paths, run.transform)[:, 0]
    results, _ = run.predict(paths)
    for logit, result in zip(logits.tolist(), results, strict=True):
        assert result["label"] == (run.classes[1] if logit > 0 else run.classes[0])


def test_binary_as_softmax_when_asked(binary_dataset, tmp_path, fast):
    run = api.train(binary_dataset, tmp_path / "run", **{**fast, "binary_logit": False})
    assert run.model.head[-1].out_features == 2


def test_predict_from_saved_run_reproduces_evaluate(dataset, tmp_path, fast):
    trained = api.train(dataset, tmp_path / "run", **{**fast, "epochs_frozen": 8})
    reloaded = Run(tmp_path / "run")  # nothing but the folder
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    results, skipped = reloaded.predict(split["val"])
    assert not skipped
    truth = [Path(p).parent.name for p in split["val"]]
    accuracy = sum(r["label"] == t for r, t in zip(results, truth, strict=True)) / len(truth)
    assert accuracy == pytest.approx(trained.metrics["accuracy"])
    counts = torch.tensor(trained.metrics["confusion_matrix"]).sum(dim=0).tolist()
    predicted = [sum(r["label"] == c for r in results) for c in trained.classes]
    assert predicted == counts


def test_head_spec_is_built_and_saved(dataset, tmp_path, fast):
    run = api.train(
        dataset, tmp_path / "run", **{**fast, "head_hidden": [16, 8], "head_batchnorm": True, "head_dropout": 0.3}
    )
    layers = [type(m).__name__ for m in run.model.head]
    assert layers == ["Dropout", "Linear", "ReLU", "BatchNorm1d", "Linear", "ReLU", "BatchNorm1d", "Linear"]
    assert run.meta["head"] == {"hidden": [16, 8], "dropout": 0.3, "batchnorm": True}


class InterruptAtEpoch(Callback):
    """Ctrl-C once the `epoch`-th epoch is logged (history.csv has its row: the folder's callbacks come first)."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.logs = epoch, []

    def after_epoch(self, trainer, log) -> None:
        self.logs.append(log)
        if len(self.logs) == self.epoch:
            raise KeyboardInterrupt


def test_interrupt_keeps_the_best_model_so_far(dataset, tmp_path, fast):
    interrupt = InterruptAtEpoch(2)
    with pytest.raises(KeyboardInterrupt):
        api.train(dataset, tmp_path / "run", callbacks=[interrupt], **{**fast, "epochs_frozen": 10})
    saved = Run(tmp_path / "run")
    assert saved.meta["interrupted"] is True
    assert len(interrupt.logs) == 2 and len((tmp_path / "run" / "history.csv").read_text().splitlines()) == 3
    results, _ = saved.predict([str(dataset)])
    assert len(results) == 36


def test_gradient_accumulation_equals_the_larger_batch(dataset, tmp_path, fast):
    # 24 training images: 3 batches of 8, or 6 of 4 accumulated in pairs -> the same optimizer steps.
    options = {**fast, "epochs_finetune": 0, "epochs_frozen": 3, "head_dropout": 0.0, "val_split": 1 / 3}
    big = api.train(dataset, tmp_path / "big", batch_size=8, **{k: v for k, v in options.items() if k != "batch_size"})
    small = api.train(dataset, tmp_path / "small", batch_size=4, accumulate=2,
                      **{k: v for k, v in options.items() if k != "batch_size"})
    a, b = load_file(str(big.path / "model.safetensors")), load_file(str(small.path / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("head")) < 1e-5


def test_bf16_on_cpu_trains_and_fp16_on_cpu_is_refused(dataset, tmp_path, fast):
    from transferkit.errors import UserError

    run = api.train(dataset, tmp_path / "bf16", precision="bf16", **fast)
    assert run.metrics["n"] > 0
    with pytest.raises(UserError, match="fp16"):
        api.train(dataset, tmp_path / "fp16", precision="fp16", **fast)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_requested_without_a_gpu_is_a_user_error(dataset, tmp_path, fast):
    from transferkit.errors import UserError

    with pytest.raises(UserError, match="CUDA"):
        api.train(dataset, tmp_path / "cuda", device="cuda", **fast)


def test_balanced_accuracy_is_scikit_learn_s_for_every_task_kind():
    generator = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(60, 3, generator=generator), torch.randint(0, 3, (60,), generator=generator)
    expected = balanced_accuracy_score(targets.numpy(), logits.argmax(1).numpy())
    assert MultiClass(["a", "b", "c"]).balanced_accuracy(logits, targets) == pytest.approx(expected)
    labels = (torch.rand(60, 4, generator=generator) > 0.7).float()
    per_label = [balanced_accuracy_score(labels[:, j].numpy(), (logits[:, j % 3] > 0).numpy()) for j in range(4)]
    assert MultiLabel(list("wxyz")).balanced_accuracy(logits[:, [0, 1, 2, 0]], labels) == pytest.approx(
        sum(per_label) / 4)


def test_balanced_accuracy_monitor_keeps_its_best_epoch(dataset, tmp_path, fast):
    run = api.train(dataset, tmp_path / "run", **{**fast, "epochs_frozen": 5, "epochs_finetune": 1, "patience": 0,
                                                  "monitor": "val_balanced_acc"})
    history = read_history(run.path / "history.csv")
    best = max(row["val_balanced_acc"] for row in history)
    meta = json.loads((run.path / "meta.json").read_text())
    assert meta["kept"]["monitor"] == "val_balanced_acc" and meta["kept"]["value"] == pytest.approx(best)
    assert run.evaluate(dataset, split="val", write=False)["balanced_accuracy"] == pytest.approx(best)
