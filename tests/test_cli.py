"""The command line: every bad input is one clear line on stderr and exit code 2; JSON outputs have their shape."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from tests.conftest import make_class_folders, make_image
from transferkit.cli.main import run_cli


def fails_with(capsys, argv: list[str], *fragments: str) -> str:
    code = run_cli(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}, stderr: {err}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("transferkit: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], f"'{fragment}' not in: {lines[0]}"
    return lines[0]


def fast_args(tiny_weights: str) -> list[str]:
    return [
        "--backbone",
        "test_efficientnet",
        "--weights",
        tiny_weights,
        "--image-size",
        "32",
        "--workers",
        "0",
        "--epochs-frozen",
        "2",
        "--epochs-finetune",
        "1",
        "--augment",
        "none",
        "--batch-size",
        "8",
    ]


def test_missing_data_path(capsys, tmp_path):
    fails_with(capsys, ["train", str(tmp_path / "nope"), "--out", str(tmp_path / "run")], "nope")


def test_empty_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    fails_with(capsys, ["train", str(tmp_path / "empty"), "--out", str(tmp_path / "run")], "no images")


def test_one_class_only(capsys, tmp_path):
    data = make_class_folders(tmp_path / "d", classes=1, per_class=4)
    fails_with(capsys, ["train", str(data), "--out", str(tmp_path / "run")], "class_0")


def test_class_with_fewer_than_two_images(capsys, tmp_path):
    data = make_class_folders(tmp_path / "d", classes=2, per_class=4)
    for extra in list((data / "class_1").iterdir())[1:]:
        extra.unlink()
    fails_with(capsys, ["train", str(data), "--out", str(tmp_path / "run")], "class_1")


def test_val_class_missing_from_train(capsys, tmp_path):
    make_class_folders(tmp_path / "d" / "train", classes=2, per_class=3)
    make_class_folders(tmp_path / "d" / "val", classes=3, per_class=2)
    fails_with(capsys, ["train", str(tmp_path / "d"), "--out", str(tmp_path / "run")], "class_2")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--backbone", "no_such_net"], "unknown backbone"),
        (["--recipe", "nope"], "unknown recipe"),
        (["--augment", "wild"], "augment"),
        (["--val-split", "1.5"], "val"),
        (["--unfreeze", "many"], "unfreeze"),
        (["--optimizer", "adagrad"], "optimizer"),
        (["--bogus-flag"], "bogus"),
        (["--batch-size", "eight"], "batch-size"),
        (["--head-hidden", "10,x"], "head-hidden"),
        (["--precision", "fp64"], "precision"),
        (["--accumulate", "0"], "accumulate"),
        (["--weights", "/no/such/file.pth", "--backbone", "resnet50"], "weights file not found"),
    ],
)
def test_bad_flags(capsys, dataset, tmp_path, flags, fragment):
    fails_with(capsys, ["train", str(dataset), "--out", str(tmp_path / "run"), *flags], fragment)
    assert not (tmp_path / "run" / "meta.json").exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x02junk" * 50, b"# a README\n", "pickled object"])
def test_unreadable_weights_file_is_one_line(capsys, dataset, tmp_path, content):
    """An empty file once raised IndexError while the message was built; a pickled object is refused unrun."""
    weights = tmp_path / "w.pth"
    if content == "pickled object":
        torch.save({"model": torch.nn.Linear(2, 2)}, weights)
    else:
        weights.write_bytes(content)
    fails_with(capsys, ["train", str(dataset), "--out", str(tmp_path / "run"), "--weights", str(weights)],
               f"cannot read weights file {weights}: not a .safetensors file or a PyTorch file of tensors")


def test_backbone_without_offline_weights_fails_fast_when_offline(capsys, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails_with(
        capsys,
        ["train", str(dataset), "--out", str(tmp_path / "run"), "--backbone", "resnet50"],
        "resnet50",
        "--weights",
    )


def test_config_file_with_unknown_key(capsys, dataset, tmp_path):
    (tmp_path / "c.yaml").write_text("epochs_frozen: 2\nlearning_rate: 0.1\n")
    fails_with(
        capsys,
        ["train", str(dataset), "--out", str(tmp_path / "r"), "--config", str(tmp_path / "c.yaml")],
        "learning_rate",
    )


def test_existing_run_is_not_overwritten(capsys, dataset, tmp_path, tiny_weights):
    out = tmp_path / "run"
    assert run_cli(["train", str(dataset), "--out", str(out), "--quiet", *fast_args(tiny_weights)]) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    fails_with(capsys, ["train", str(dataset), "--out", str(out), *fast_args(tiny_weights)], "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before


def test_train_json_then_predict_and_evaluate(capsys, dataset, tmp_path, tiny_weights):
    out = tmp_path / "run"
    assert run_cli(["train", str(dataset), "--out", str(out), "--json", *fast_args(tiny_weights)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "val" and metrics["classes"] == ["class_0", "class_1", "class_2"]
    for name in (
        "model.safetensors",
        "meta.json",
        "config.yaml",
        "split.json",
        "history.csv",
        "metrics.json",
        "curves.png",
        "confusion.png",
    ):
        assert (out / name).is_file(), name

    image = next((dataset / "class_1").iterdir())
    assert run_cli(["predict", str(out), str(image), "--json", "--top-k", "2"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["path"] == str(image.resolve()) and result["label"] in metrics["classes"]
    assert len(result["top"]) == 2 and result["top"][0]["label"] == result["label"]
    assert result["top"][0]["probability"] >= result["top"][1]["probability"]

    assert run_cli(["evaluate", str(out), str(dataset), "--json", "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == metrics["accuracy"]


def test_predict_skips_bad_files_and_fails_on_nothing_readable(capsys, dataset, tmp_path, tiny_weights):
    out = tmp_path / "run"
    assert run_cli(["train", str(dataset), "--out", str(out), "--quiet", *fast_args(tiny_weights)]) == 0
    folder = tmp_path / "mixed"
    shutil.copytree(dataset / "class_0", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "notes.txt").write_text("hello")
    capsys.readouterr()
    assert run_cli(["predict", str(out), str(folder), "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 12
    assert "broken.jpg" in captured.err and "notes.txt" in captured.err
    fails_with(capsys, ["predict", str(out), str(folder / "broken.jpg")], "no readable images")
    fails_with(capsys, ["predict", str(tmp_path / "not_a_run"), str(folder)], "run folder")


def test_evaluate_bad_split(capsys, tmp_path, dataset):
    fails_with(capsys, ["evaluate", str(tmp_path), str(dataset), "--split", "holdout"], "split")


def test_backbones_json_lists_offline_availability(capsys):
    assert run_cli(["backbones", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["tf_efficientnet_lite0"]["offline_weights"] is True
    assert rows["tf_efficientnet_lite0"]["input_size"] == 224 and rows["xception"]["input_size"] == 299
    assert rows["mobilenetv2_100"]["offline_weights"] is True
    assert rows["resnet50"]["offline_weights"] is False
    assert 3.2e6 < rows["tf_efficientnet_lite0"]["parameters"] < 3.5e6  # without the ImageNet head
    assert {"resnet50", "xception", "inception_resnet_v2", "tf_efficientnet_lite2"} <= set(rows)


def test_imagenet_names_a_cat_in_chelsea(capsys, tmp_path):
    path = tmp_path / "chelsea.png"
    Image.fromarray(skimage.data.chelsea()).save(path)
    assert run_cli(["imagenet", str(path), "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    labels = [t["label"] for t in result["top"]]
    assert len(labels) == 5 and any("cat" in label for label in labels), labels
    assert sum(t["probability"] for t in result["top"]) <= 1.0 + 1e-6


def test_imagenet_on_grayscale_and_rgba_inputs(capsys, tmp_path):
    rgb = skimage.data.chelsea()
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(tmp_path / "rgba.png")
    assert run_cli(["imagenet", str(tmp_path), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_no_arguments_prints_help(capsys):
    assert run_cli([]) == 0
    assert "train" in capsys.readouterr().out


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "transferkit", "train", str(tmp_path / "nope"), "--out", str(Path(tmp_path) / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_unreachable_hub_fails_fast_with_the_way_out(capsys, dataset, tmp_path, monkeypatch):
    from transferkit.models import registry

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(registry, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(registry.timm, "create_model", lambda *a, **k: pytest.fail("must not try the hub"))
    fails_with(capsys, ["train", str(dataset), "--out", str(tmp_path / "run"), "--backbone", "xception"],
               "unreachable", "--weights")


def test_file_names_that_look_like_markup_print_as_they_are(capsys, dataset, tmp_path, tiny_weights):
    (dataset / "class_0" / "[bold] x.png").write_bytes(b"not an image")  # markup would swallow the brackets
    assert run_cli(["train", str(dataset), "--out", str(tmp_path / "run"), "--quiet", *fast_args(tiny_weights)]) == 0
    err = capsys.readouterr().err
    assert "[bold] x.png: not an image" in err


def test_backbones_names_are_whole_at_80_columns_in_a_pipe(capsys):
    assert run_cli(["backbones"]) == 0
    table = capsys.readouterr().err  # captured: not a terminal, rich's 80 columns
    assert "…" not in table
    from transferkit.models.registry import BACKBONES

    listed = {line.split()[0].rstrip("*") for line in table.splitlines() if line.strip()}
    assert set(BACKBONES) <= listed


@pytest.mark.parametrize("command", ["train", "doctor", "auto"])
def test_help_shows_the_defaults_a_config_fills_in(capsys, command):
    from dataclasses import asdict

    from transferkit.config import TrainConfig
    from transferkit.doctor.options import DoctorOptions

    assert run_cli([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    defaults = asdict(DoctorOptions() if command == "doctor" else TrainConfig())
    for option in ("seed", "batch-size", "workers"):
        value = defaults[option.replace("-", "_")]
        assert re.search(rf"--{option} <int> [^\[]*\[default: {value}\]", text), option
    if command == "train":
        assert "Epochs training the head on the frozen base. [default: 30]" in text
        assert "Epochs fine-tuning after unfreezing; auto: 3 on a GPU, and on a CPU from 700 training images" in text
        assert re.search(r"--epochs-finetune <str> [^\[]*\[default: auto\]", text)


def test_training_data_that_leaves_no_validation_image_is_one_line(tmp_path, capsys, tiny_weights):
    # One train row per class must stay in train: nothing is left for validation, which training cannot do without.
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for c, name in enumerate("ab"):
        for i in range(3):
            make_image(c, rng).save(tmp_path / f"{name}{i}.png")
            rows.append(f"{name}{i}.png,{name},{'train' if i == 0 else 'test'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    argv = ["train", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "run"), *fast_args(tiny_weights)]
    fails_with(capsys, argv, "no validation images")


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("ema_decay=1.5", "ema_decay"),
        ("layer_decay=0", "layer_decay"),
        ("mixup=-1", "mixup"),
        ("cutmix=-0.5", "cutmix"),
        ("class_balance=auto", "class_balance must be one of none, weights, sampler"),
        ("augment_options={policy: rand-x9}", "RandAugment"),
    ],
)
def test_bad_finetune_options(capsys, dataset, tmp_path, setting, fragment):
    fails_with(capsys, ["train", str(dataset), "--out", str(tmp_path / "run"), "--set", setting], fragment)
    assert not (tmp_path / "run").exists()


def test_finetune_options_are_listed_with_their_help(capsys):
    assert run_cli(["config", "--set", "augment=randaugment", "--set", "ema_decay=0.999"]) == 0
    out = capsys.readouterr().out
    assert "ema_decay = 0.999  (default 0.0)" in out and "augment = 'randaugment'" in out
    for key in ("layer_decay", "ema_warmup", "mixup", "cutmix", "class_balance"):
        assert re.search(rf"^\s*{key} = .*\n\s+\S", out, re.MULTILINE), f"{key} has no help line"


def test_a_killed_loader_worker_is_one_line(capsys, dataset, tmp_path, monkeypatch):
    """What PyTorch raises after the system's out-of-memory killer takes a loader process; other errors surface."""
    from transferkit import api

    def killed(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid(s) 5099) exited unexpectedly")

    monkeypatch.setattr(api, "train", killed)
    fails_with(capsys, ["train", str(dataset), "--out", str(tmp_path / "run")], "worker process died", "--batch-size")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(api, "train", broken)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        run_cli(["train", str(dataset), "--out", str(tmp_path / "run")])


def test_train_without_out_writes_runs_named_after_the_data(capsys, dataset, tmp_path, tiny_weights, monkeypatch):
    """`transferkit train my_photos/` as the README's first line types it: runs/my_photos, then runs/my_photos-2."""
    monkeypatch.chdir(tmp_path)
    assert run_cli(["train", f"{dataset}/", *fast_args(tiny_weights)]) == 0
    assert f"run folder: runs/{dataset.name} (--out chooses another)" in capsys.readouterr().err
    assert run_cli(["train", str(dataset), "--quiet", *fast_args(tiny_weights)]) == 0
    assert (tmp_path / "runs" / dataset.name / "meta.json").is_file()
    assert (tmp_path / "runs" / f"{dataset.name}-2" / "meta.json").is_file()


def test_train_on_a_cpu_skips_fine_tuning_unless_asked(capsys, dataset, tmp_path, tiny_weights, monkeypatch):
    """epochs_finetune auto (decision 0303): the frozen stage alone on a CPU for a small training split, said once
    and written down."""
    args = fast_args(tiny_weights)
    at = args.index("--epochs-finetune")
    without = args[:at] + args[at + 2:]
    assert run_cli(["train", str(dataset), "--out", str(tmp_path / "auto"), *without]) == 0
    assert "fine-tuning: none (epochs_finetune auto: 30 training images on a CPU are too few" in capsys.readouterr().err
    history = (tmp_path / "auto" / "history.csv").read_text().splitlines()[1:]
    assert {row.split(",")[1] for row in history} == {"frozen"}
    assert "epochs_finetune: 0\n" in (tmp_path / "auto" / "config.yaml").read_text()
    assert run_cli(["train", str(dataset), "--out", str(tmp_path / "asked"), *without, "--epochs-finetune", "1"]) == 0
    assert "fine-tuning: none" not in capsys.readouterr().err
    history = (tmp_path / "asked" / "history.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1] for row in history][-1] == "finetune"
    fails_with(capsys, ["train", str(dataset), "--out", str(tmp_path / "bad"), "--epochs-finetune", "x"],
               "epochs_finetune must be auto or 0 or more")
    monkeypatch.setattr("transferkit.config.AUTO_FINETUNE_MIN_CPU_IMAGES", 2)  # a training split this size "is large"
    assert run_cli(["train", str(dataset), "--out", str(tmp_path / "large"), *without, "--quiet"]) == 0
    history = (tmp_path / "large" / "history.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1] for row in history][-1] == "finetune"
    assert "epochs_finetune: 3\n" in (tmp_path / "large" / "config.yaml").read_text()
