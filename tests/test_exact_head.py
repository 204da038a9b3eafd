"""The frozen stage's exact linear head and multi-depth features: on generated data where the answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from tests.test_multilabel import multilabel_csv
from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.errors import UserError
from transferkit.export.onnx import export_run
from transferkit.insight.explain import _activation_and_logits, explain_files
from transferkit.models.classifier import Classifier, HeadSpec, build_head, depth_columns, embed_width
from transferkit.predictor import OnnxPredictor
from transferkit.runs.run import Run, image_loader
from transferkit.training import exact_head
from transferkit.training.callbacks import PauseAfter
from transferkit.training.exact_head import C_GRID, choose_depths, depth_candidates, fit_linear


def blobs(n: int, classes: int, dim: int, seed: int, informative: slice = slice(0, 4)) -> tuple[np.ndarray, ...]:
    """Gaussian classes that differ only in the `informative` columns, on features of very different scales."""
    rng = np.random.default_rng(seed)
    y = rng.integers(classes, size=n)
    x = rng.normal(size=(n, dim))
    centres = rng.normal(scale=1.5, size=(classes, dim))
    x[:, informative] += centres[y][:, informative]
    x *= rng.uniform(0.01, 100, size=dim)  # scales a head must not be sensitive to
    return x.astype(np.float32), y


def head_logits(fit, x: np.ndarray) -> np.ndarray:
    layer = nn.Linear(x.shape[1], fit.weight.shape[0])
    fit.load_into(layer)
    with torch.no_grad():
        return layer(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("classes", [2, 3])
def test_exact_head_matches_the_standardised_sklearn_probe(classes):
    x, y = blobs(300, classes, 20, seed=1)
    x, y, val_x, val_y, test_x, test_y = x[:150], y[:150], x[150:200], y[150:200], x[200:], y[200:]
    outputs = 1 if classes == 2 else classes
    fit = fit_linear(x, y, val_x, val_y, outputs)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=fit.C, max_iter=1000)).fit(x, y)
    logits = torch.from_numpy(head_logits(fit, test_x))
    probs = torch.sigmoid(logits[:, 0]).numpy() if classes == 2 else torch.softmax(logits, 1).numpy()
    expected = probe.predict_proba(test_x)
    # the same optimum up to the solver's tolerance (the head was warm-started along the grid, the probe was not)
    probs_2d = np.stack([1 - probs, probs], 1) if classes == 2 else probs
    assert log_loss(test_y, probs_2d) == pytest.approx(log_loss(test_y, expected), rel=0.02)
    predicted = (probs > 0.5).astype(int) if classes == 2 else probs.argmax(1)
    assert (predicted == probe.predict(test_x)).mean() >= 0.99
    assert (predicted == test_y).mean() > 0.8  # the informative columns are found despite their scales


def test_c_is_the_grid_value_with_the_lowest_validation_loss():
    x, y = blobs(120, 2, 60, seed=2)
    val_x, val_y = blobs(200, 2, 60, seed=3)
    fit = fit_linear(x, y, val_x, val_y, 1)
    losses = {c: log_loss(val_y, make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
                          .fit(x, y).predict_proba(val_x)) for c in C_GRID}
    assert losses[fit.C] == pytest.approx(min(losses.values()), abs=1e-3)
    assert fit.val_loss == pytest.approx(losses[fit.C], abs=1e-3)


def test_two_softmax_logits_give_the_one_logit_probabilities():
    x, y = blobs(150, 2, 10, seed=4)
    one, two = fit_linear(x, y, x, y, 1), fit_linear(x, y, x, y, 2)
    p_one = torch.sigmoid(torch.from_numpy(head_logits(one, x))[:, 0])
    p_two = torch.softmax(torch.from_numpy(head_logits(two, x)), 1)[:, 1]
    torch.testing.assert_close(p_one, p_two, atol=1e-5, rtol=0)


def test_the_depth_set_carrying_the_signal_is_chosen():
    # three levels of 8 columns each, then the 8 "last layer" columns: only level 1 tells the classes apart
    x, y = blobs(400, 3, 32, seed=5, informative=slice(8, 16))
    val_x, val_y = x[300:], y[300:]
    widths = {0: range(0, 8), 1: range(8, 16), 2: range(16, 24)}
    columns = {d: np.array([c for level in d for c in widths[level]] + list(range(24, 32)))
               for d in depth_candidates([0, 1, 2])}
    chosen, fit = choose_depths(columns, x[:300], y[:300], val_x, val_y, 3)
    assert 1 in chosen
    assert fit.weight.shape == (3, len(columns[chosen]))


def test_the_c_grid_is_solved_on_one_blas_thread(monkeypatch):
    """Head-sized problems: one BLAS thread (decision 0305), seen from inside each fit."""
    from threadpoolctl import threadpool_limits

    from transferkit.cpu import blas_threads

    seen: list[int] = []

    class Recording(exact_head.LogisticRegression):
        def fit(self, *args, **kwargs):
            seen.append(blas_threads())
            return super().fit(*args, **kwargs)

    monkeypatch.setattr(exact_head, "LogisticRegression", Recording)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((60, 16)), np.arange(60) % 3
    with threadpool_limits(limits=2, user_api="blas"):  # as a 2-core process has them
        exact_head.fit_linear(x, y, x, y, 3)
    assert seen and set(seen) == {1}


def test_depth_candidates_are_nested_from_the_last_layer_alone():
    assert depth_candidates([0, 1, 2]) == [(), (2,), (1, 2), (0, 1, 2)]


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet", "test_vit"])
def test_multi_depth_embed_is_pooled_levels_then_the_last_layer(name):
    torch.manual_seed(0)
    backbone = timm.create_model(name, pretrained=False, num_classes=0).eval()
    size = backbone.pretrained_cfg["input_size"][1:] if name == "test_vit" else (64, 64)
    images = torch.randn(2, 3, *size)
    model = Classifier(backbone, build_head(embed_width(backbone, (1, 2)), 3, HeadSpec()), (1, 2)).eval()
    with torch.no_grad():
        features = model.embed(images)
        every_level = Classifier(backbone, nn.Identity(), tuple(range(len(backbone.feature_info)))).embed(images)
        plain = Classifier(backbone, nn.Identity()).embed(images)
    assert features.shape == (2, model.num_features)
    torch.testing.assert_close(features[:, -backbone.num_features:], plain)
    columns = depth_columns(backbone, tuple(range(len(backbone.feature_info))), (1, 2))
    torch.testing.assert_close(features, every_level[:, columns])


def own_features(run: Run, paths: list[str]) -> np.ndarray:
    """The loaded run's pooled features of images, through its own model and preprocessing."""
    with torch.no_grad():
        return torch.cat([run.model.embed(images) for images, _ in image_loader(paths, run.transform)]).numpy()


def test_the_default_head_is_the_probe_on_the_run_s_own_features(binary_dataset, tmp_path, fast):
    options = {**{k: v for k, v in fast.items() if k != "head_fit"}, "epochs_finetune": 0}  # the default head
    api.train(binary_dataset, tmp_path / "a", **options)
    api.train(binary_dataset, tmp_path / "b", **options)
    run, again = Run(tmp_path / "a"), Run(tmp_path / "b")
    torch.testing.assert_close(run.model.head.state_dict(), again.model.head.state_dict(), rtol=0, atol=0)
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["head_fit"] == "exact" and meta["feature_depths"] == []
    history = (tmp_path / "a" / "history.csv").read_text().splitlines()
    assert len(history) == 2 and ",frozen," in history[1]  # one row: the solved head
    # the head is the validated logistic regression on the run's own frozen features of its training images
    split = json.loads((tmp_path / "a" / "split.json").read_text())
    classes = run.classes
    x, val_x = own_features(run, split["train"]), own_features(run, split["val"])
    y, val_y = (np.array([classes.index(label) for label in split["labels"][s]]) for s in ("train", "val"))
    expected = head_logits(fit_linear(x, y, val_x, val_y, 1), val_x)
    with torch.no_grad():
        got = run.model.head(torch.from_numpy(val_x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-3 * max(1.0, np.abs(expected).max()))


def test_class_balance_weighs_the_classes_of_the_exact_head():
    rng = np.random.default_rng(0)

    def skewed(n: int) -> tuple[np.ndarray, np.ndarray]:  # overlapping classes, 9 common images to 1 rare
        y = (np.arange(n) % 10 == 0).astype(int)
        return (rng.normal(0.0, 1.0, (n, 4)) + 0.8 * y[:, None]).astype(np.float32), y

    (x, y), (val_x, val_y) = skewed(500), skewed(500)
    plain = head_logits(fit_linear(x, y, val_x, val_y, 2), val_x).argmax(1)
    weights = len(y) / (2 * np.bincount(y))  # the task's inverse-frequency class_weights
    balanced = head_logits(fit_linear(x, y, val_x, val_y, 2, class_weights=weights), val_x).argmax(1)
    recall = {name: (p[val_y == 1] == 1).mean() for name, p in (("plain", plain), ("balanced", balanced))}
    assert recall["plain"] < 0.3 < 0.6 < recall["balanced"]


def test_auto_depths_are_recorded_and_followed_by_predict(dataset, tmp_path, fast):
    api.train(dataset, tmp_path / "run", **{**fast, "epochs_finetune": 0, "feature_depths": "auto",
                                            "head_fit": "exact"})
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    run = Run(tmp_path / "run")
    assert run.model.depths == tuple(meta["feature_depths"])
    assert set(meta["feature_depths"]) <= set(range(len(run.model.backbone.feature_info)))
    assert run.model.head[-1].in_features == run.model.num_features
    # what stage 1 chose on validation is what a fresh fit on the run's own features of the chosen depths gives
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    x, val_x = own_features(run, split["train"]), own_features(run, split["val"])
    y, val_y = (np.array([run.classes.index(label) for label in split["labels"][s]]) for s in ("train", "val"))
    with torch.no_grad():
        got = run.model.head(torch.from_numpy(val_x)).numpy()
    expected = head_logits(fit_linear(x, y, val_x, val_y, 3), val_x)
    np.testing.assert_allclose(got, expected, atol=1e-3 * max(1.0, np.abs(expected).max()))


def test_depths_are_compared_on_the_clean_view_and_solved_on_every_view(dataset, tmp_path, fast, monkeypatch):
    """With the 8 symmetries as views, comparing depth sets on all 8 cost 8x for the same choice (decision 0300):
    the comparison sees the clean rows, the kept head every view's rows."""
    from transferkit.training import two_stage

    rows: dict[str, list[int]] = {"compared": [], "solved": []}
    compare, solve = two_stage.choose_depths, two_stage.fit_linear
    monkeypatch.setattr(two_stage, "choose_depths", lambda c, x, *a, **k: rows["compared"].append(len(x)) or
                        compare(c, x, *a, **k))
    monkeypatch.setattr(two_stage, "fit_linear", lambda x, *a, **k: rows["solved"].append(len(x)) or solve(x, *a, **k))
    run = api.train(dataset, tmp_path / "run", **{**fast, "epochs_finetune": 0, "feature_depths": "auto",
                                                  "head_fit": "exact", "augment": "dihedral"})
    train_images = len(json.loads((run.path / "split.json").read_text())["train"])
    assert rows == {"compared": [train_images], "solved": [8 * train_images]}


def test_fine_tuning_starts_from_the_solved_head_and_works_with_depths(dataset, tmp_path, fast):
    run = api.train(dataset, tmp_path / "run", **{**fast, "feature_depths": "1,2", "head_fit": "exact"})
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in history[1:]] == ["frozen", "finetune"]
    loaded = Run(tmp_path / "run")
    assert loaded.model.depths == (1, 2) and run.model.depths == (1, 2)
    # export, predict and explain compute the same multi-depth features
    paths = sorted(str(p) for p in dataset.rglob("*.png"))
    report = export_run(loaded.path, out=tmp_path / "m.onnx")
    assert report.check.agreement == 1.0
    assert np.abs(OnnxPredictor(tmp_path / "m.onnx").probabilities(paths) - loaded.probabilities(paths)).max() <= 1e-4
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.model(pixels)
    torch.testing.assert_close(_activation_and_logits(loaded.model, pixels)[1].detach(), expected)
    assert all(Path(m["overlay"]).is_file() for m in explain_files(loaded, paths[:2], tmp_path / "cams"))


def test_levels_the_backbone_lacks_are_a_user_error(dataset, tmp_path, fast, tiny_weights):
    with pytest.raises(UserError, match="levels 0..4"):
        api.train(dataset, tmp_path / "run", **{**fast, "feature_depths": "9"})
    code = run_cli(["train", str(dataset), "--out", str(tmp_path / "cli"), "--weights", tiny_weights,
                    "--backbone", "test_efficientnet", "--feature-depths", "two", "--quiet"])
    assert code == 2


def test_a_paused_run_with_chosen_depths_resumes_to_the_uninterrupted_result(dataset, tmp_path, fast):
    options = {**fast, "feature_depths": "auto", "epochs_finetune": 2, "patience": 0, "finetune_lr": 1e-2}
    straight = api.train(dataset, tmp_path / "straight", **options)
    assert api.train(dataset, tmp_path / "paused", callbacks=[PauseAfter(1)], **options) is None
    resumed = api.resume(tmp_path / "paused")
    assert resumed.model.depths == straight.model.depths
    assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], abs=1e-5)


def test_multilabel_data_keeps_the_sgd_head_and_needs_named_levels(tmp_path, fast):
    data = multilabel_csv(tmp_path / "multi")
    with pytest.raises(UserError, match="name the levels"):
        api.train(data, tmp_path / "auto", **{**fast, "feature_depths": "auto"})
    api.train(data, tmp_path / "run", **{**fast, "epochs_finetune": 0, "head_fit": "exact"})
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["head_fit"] == "sgd"
    assert sum(1 for row in (tmp_path / "run" / "history.csv").read_text().splitlines() if ",frozen," in row) == 3
