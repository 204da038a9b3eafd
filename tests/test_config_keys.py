"""Every configuration key from the command line (`--set`), typed, with its help from config.py's own comments."""

from __future__ import annotations

from dataclasses import fields

import pytest
import yaml

from tests.test_cli import fails_with
from transferkit import api
from transferkit.cli.main import run_cli
from transferkit.config import TrainConfig, resolve_config
from transferkit.config_keys import key_help, parse_settings
from transferkit.errors import UserError


def test_every_field_has_an_entry_and_documented_ones_their_comment():
    rows = {row["key"]: row for row in key_help()}
    assert list(rows) == [f.name for f in fields(TrainConfig)]
    assert rows["feature_views"]["help"].startswith("views per training image")
    assert rows["unfreeze"]["default"] == "3" and rows["head_hidden"]["default"] == []


@pytest.mark.parametrize(("pair", "key", "value"), [
    ("feature_views=1", "feature_views", 1), ("head-hidden=[256, 64]", "head_hidden", [256, 64]),
    ("lr=0.01", "lr", 0.01), ("lr=1", "lr", 1.0), ("unfreeze=2", "unfreeze", "2"), ("weights=", "weights", None),
    ("finetune_bn=true", "finetune_bn", True), ("augment_options={rotation: 5}", "augment_options", {"rotation": 5}),
])
def test_values_are_read_as_yaml_and_typed_as_the_field(pair, key, value):
    assert parse_settings([pair]) == {key: value}
    assert getattr(resolve_config(None, None, **parse_settings([pair])), key) == value


@pytest.mark.parametrize(("pair", "message"), [
    ("feature_view=1", "did you mean 'feature_views'"), ("epochs_frozen=abc", "expects int"),
    ("finetune_bn=3", "expects bool"), ("head_hidden=[a]", r"expects list\[int\]"), ("novalue", "KEY=VALUE"),
])
def test_bad_settings_are_one_clear_error(pair, message):
    with pytest.raises(UserError, match=message):
        parse_settings([pair])


def test_a_config_file_value_of_the_wrong_type_is_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"batch_size": "big"}))
    fails_with(capsys, ["config", "--config", str(path)], "batch_size", "expects int")


def test_set_reaches_the_run_and_a_flag_wins_over_it(dataset, tmp_path, fast, capsys):
    argv = ["train", str(dataset), "--out", str(tmp_path / "run"), "--backbone", fast["backbone"], "--weights",
            fast["weights"], "--image-size", "32", "--workers", "0", "--epochs-finetune", "0", "--quiet",
            "--set", "epochs_frozen=2", "--set", "head_dropout=0.1", "--set", "feature_views=1",
            "--set", "batch_size=4", "--batch-size", "8"]
    assert run_cli(argv) == 0
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (config["epochs_frozen"], config["head_dropout"], config["feature_views"]) == (2, 0.1, 1)
    assert config["batch_size"] == 8
    assert api.load(tmp_path / "run").meta["classes"]


def test_config_command_shows_resolved_values_and_help(capsys):
    assert run_cli(["config", "--recipe", "urban-rural", "--set", "seed=7"]) == 0
    out = capsys.readouterr().out
    assert "seed = 7  (default 0)" in out and "backbone = 'resnet50'" in out
    assert "views per training image" in out
