"""What makes a small frozen-only run cheap without changing its result: feature_views auto (augmented views only
for small training sets), the best-weights copy reusing its buffers, the head's epochs on one CPU thread, and the
report showing the figures evaluation saved."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest
import torch

from transferkit import api, config
from transferkit.config import resolve_config
from transferkit.errors import UserError
from transferkit.report.figures import confusion_uri, stage_curves
from transferkit.runs.files import read_history
from transferkit.training import two_stage
from transferkit.training.compute import intra_op_threads
from transferkit.training.state import BestKeeper, EpochLog


def test_feature_views_auto_extracts_augmented_views_only_for_an_exact_head_on_a_small_average_pooled_set():
    sgd = resolve_config(None, None, head_fit="sgd", pool="avg")
    assert sgd.feature_views == "auto"
    assert sgd.views_for(10) == sgd.views_for(10**6) == 1
    assert resolve_config(None, None, head_hidden=[16], pool="avg").views_for(10) == 1  # a hidden layer keeps SGD
    default = resolve_config(None, None)
    assert default.head_fit == "exact" and default.pool == "auto"  # the defaults (decisions 0280, 0298)
    assert default.views_for(10) == resolve_config(None, None, pool="max").views_for(10) == 1
    exact = resolve_config(None, None, pool="avg")
    assert exact.views_for(config.AUTO_VIEWS_MAX_IMAGES) == config.AUTO_VIEWS == 3
    assert exact.views_for(config.AUTO_VIEWS_MAX_IMAGES + 1) == 1
    assert resolve_config(None, None, feature_views=2).views_for(10**6) == 2  # a number is used as given
    for bad in (0, "many"):
        with pytest.raises(UserError, match="feature_views"):
            resolve_config(None, None, feature_views=bad)


def views_extracted(dataset, out, fast, monkeypatch, **options) -> int:
    """How many views of the training images stage 1 asked for."""
    seen: list[int] = []
    shared = two_stage.shared_tables

    def spy(extract, ranks, paths, views, description, crops):
        if description == "features train":
            seen.append(len(views))
        return shared(extract, ranks, paths, views, description, crops)

    monkeypatch.setattr(two_stage, "shared_tables", spy)
    api.train(dataset, out, **{**fast, "epochs_finetune": 0, "epochs_frozen": 1, "augment": "light", **options})
    return seen[0]


def test_frozen_stage_extracts_as_many_views_as_auto_chooses(dataset, tmp_path, fast, monkeypatch):
    assert views_extracted(dataset, tmp_path / "sgd", fast, monkeypatch) == 1
    assert views_extracted(dataset, tmp_path / "max", fast, monkeypatch, head_fit="exact") == 1  # max-pooled
    assert views_extracted(dataset, tmp_path / "small", fast, monkeypatch, head_fit="exact", pool="avg") == 3  # 29
    monkeypatch.setattr(config, "AUTO_VIEWS_MAX_IMAGES", 20)
    assert views_extracted(dataset, tmp_path / "large", fast, monkeypatch, head_fit="exact", pool="avg") == 1
    assert views_extracted(dataset, tmp_path / "asked", fast, monkeypatch, feature_views=2) == 2


def log(epoch: int, val_loss: float) -> EpochLog:
    return EpochLog(epoch, "frozen", 0.0, 0.0, val_loss, 0.0, 1e-3, 0.0)


def test_best_weights_are_the_best_epochs_even_though_their_copy_is_reused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    keeper = BestKeeper("val_loss", patience=0)
    snapshots = []
    for epoch, val_loss in enumerate([0.9, 0.5, 0.7, 0.3, 0.4], start=1):
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.add_(epoch)  # weights and BN statistics change in place, as training changes them
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        keeper.update(log(epoch, val_loss), model)
    keeper.restore(model)
    assert keeper.best_epoch == ("frozen", 4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[3][key]), key
    assert all(kept.data_ptr() != live.data_ptr() for kept, live in
               zip(keeper.best_state.values(), model.state_dict().values(), strict=True))


def test_a_new_shape_is_copied_afresh():
    keeper = BestKeeper("val_loss", patience=0)
    keeper.update(log(1, 0.5), torch.nn.Linear(4, 3))
    wider = torch.nn.Linear(8, 3)  # feature_depths auto widens the head between epochs of a resumed run
    keeper.update(log(2, 0.4), wider)
    assert keeper.best_state["weight"].shape == (3, 8)
    assert torch.equal(keeper.best_state["weight"], wider.weight)


def test_intra_op_threads_are_restored_after_the_block():
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), intra_op_threads(1):
        raise RuntimeError("training failed")
    assert torch.get_num_threads() == before
    with intra_op_threads(None):
        assert torch.get_num_threads() == before


def test_the_report_shows_the_figures_evaluation_saved_which_are_the_same_drawings(dataset, tmp_path, fast):
    run = api.train(dataset, tmp_path / "run", **{**fast, "epochs_finetune": 0})
    metrics, page = run.metrics, (run.path / "report.html").read_text()
    history = read_history(run.path / "history.csv")
    saved = {name: (run.path / name).read_bytes() for name in ("confusion.png", "curves.png")}
    assert all(base64.b64encode(png).decode() in page for png in saved.values())
    assert confusion_uri(metrics["confusion_matrix"], run.classes) == \
        confusion_uri(metrics["confusion_matrix"], run.classes, run.path / "confusion.png")
    assert stage_curves(history, run.meta.get("kept")) == \
        stage_curves(history, run.meta.get("kept"), run.path / "curves.png")
    two_stages = [*history, {**history[-1], "stage": "finetune", "epoch": 1.0}]
    assert stage_curves(two_stages, None, run.path / "curves.png") == stage_curves(two_stages, None)


def test_a_command_that_loaded_torch_exits_with_its_code_after_threads_pools_and_exit_handlers(tmp_path):
    code = f"""
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import torch
from transferkit.cli.main import main
atexit.register(lambda: open({str(tmp_path / "atexit")!r}, "w").write("ran"))
threading.Thread(target=lambda: (time.sleep(0.5), open({str(tmp_path / "thread")!r}, "w").write("done"))).start()
ThreadPoolExecutor(1).submit(print, "buffered output")  # its idle worker waits until told to stop at exit
sys.argv = ["transferkit", "no-such-command"]
main()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no-such-command" in done.stderr
    assert "buffered output" in done.stdout
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "done"
