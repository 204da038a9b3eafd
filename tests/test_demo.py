"""The demo's data (elpv-dataset solar cells) and the command's wiring, on a small slice of it."""

from __future__ import annotations

import csv
import json

from transferkit import demo
from transferkit.cli.main import run_cli


def test_elpv_csv_has_every_cell_with_its_binary_label(tmp_path):
    path = demo.write_elpv_csv(tmp_path / "elpv.csv")
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2624
    labels = [row["label"] for row in rows]
    assert labels.count("functional") == 1803 and labels.count("defective") == 821
    assert all(row["path"].endswith(".png") for row in rows[:10])


def test_demo_command_trains_and_reports_the_test_split(tmp_path, monkeypatch, capsys, tiny_weights):
    full = demo.write_elpv_csv

    def small_slice(target):
        full(target)
        with target.open() as handle:
            rows = list(csv.reader(handle))
        header, body = rows[0], rows[1:]
        keep = [r for r in body if r[1] == "functional"][:24] + [r for r in body if r[1] == "defective"][:24]
        with target.open("w", newline="") as handle:
            csv.writer(handle).writerows([header, *keep])
        return target

    monkeypatch.setattr(demo, "write_elpv_csv", small_slice)
    monkeypatch.setattr(demo, "DEMO_SETTINGS", {**demo.DEMO_SETTINGS, "backbone": "test_efficientnet",
                                                "weights": tiny_weights, "image_size": 32, "workers": 0,
                                                "epochs_frozen": 2, "epochs_finetune": 1})
    assert run_cli(["demo", "--out", str(tmp_path / "demo"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "test" and metrics["n"] == 10  # 20% of 48, stratified
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())["split"] == "test"
    assert run_cli(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0  # replaces its own run
