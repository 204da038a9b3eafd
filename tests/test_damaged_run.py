"""A damaged run folder (a file cut short, emptied, edited by hand, or another run's weights) is one line naming
the file and exit code 2 in every command that opens it, never a traceback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import make_class_folders
from transferkit import api
from transferkit.cli.main import run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str) -> Path:
    root = tmp_path_factory.mktemp("damaged")
    data = make_class_folders(root / "data", classes=2)
    api.train(data, root / "run", backbone="test_efficientnet", weights=tiny_weights, image_size=32, batch_size=8,
              workers=0, epochs_frozen=2, epochs_finetune=0, augment="none", quiet=True)
    return root / "run"


def edit_meta(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        meta = json.loads((run / "meta.json").read_text())
        (run / "meta.json").write_text(json.dumps(change(meta)))

    return damage


def cut_weights(run: Path) -> None:
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


DAMAGE = {
    "weights cut short": (cut_weights, "model.safetensors is damaged"),
    "meta.json emptied": (lambda run: (run / "meta.json").write_text(""), "meta.json is damaged (JSONDecodeError"),
    "meta.json a list": (lambda run: (run / "meta.json").write_text("[1, 2]"), "meta.json is damaged (not a JSON"),
    "classes removed": (edit_meta(lambda m: {k: v for k, v in m.items() if k != "classes"}),
                        "meta.json is damaged (KeyError: 'classes')"),
    "image size a word": (edit_meta(lambda m: {**m, "image_size": "big"}), "meta.json is damaged (TypeError"),
    "mean removed": (edit_meta(lambda m: {**m, "mean": None}), "meta.json is damaged (TypeError"),
    "temperature a word": (edit_meta(lambda m: {**m, "temperature": "hot"}), "meta.json is damaged (ValueError"),
    "a third class": (edit_meta(lambda m: {**m, "classes": [*m["classes"], "extra"]}),
                      "meta.json is damaged (ValueError: a binary task has 2 classes, not 3)"),
    "another model's weights": (edit_meta(lambda m: {**m, "task": "multiclass", "binary_logit": False,
                                                     "classes": ["a", "b", "c"]}),
                                "model.safetensors does not fit the model its meta.json describes"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("command", ["predict", "evaluate", "export", "report"])
def test_a_damaged_run_is_one_line(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str,
                                   command: str) -> None:
    run = shutil.copytree(trained, tmp_path / "run")
    spoil, message = DAMAGE[damage]
    spoil(run)
    image = str(next((trained.parent / "data").rglob("*.png")))
    argv = {"predict": ["predict", str(run), image, "--engine", "torch"],
            "evaluate": ["evaluate", str(run), str(trained.parent / "data")],
            "export": ["export", str(run)], "report": ["report", str(run)]}[command]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
