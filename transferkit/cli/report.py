"""`transferkit report`: (re)write RUN/report.html, optionally evaluating the run on a dataset first."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from transferkit.cli.main import app
from transferkit.cli.output import check_paths
from transferkit.progress import console
from transferkit.runs.folder import check_run_folder


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    data: Annotated[
        str | None, typer.Option(help="Evaluate on this image folder or CSV first (metrics.json, predictions.csv).")
    ] = None,
) -> None:
    """One self-contained HTML page: data, curves, metrics, confusion, ROC, Grad-CAM, top losses, similarity."""
    check_run_folder(run)
    if data is not None:
        check_paths(data)
    from transferkit.cli.training import print_metrics_summary, report_skipped_dicts
    from transferkit.report import write_report
    from transferkit.runs.run import open_run

    loaded = open_run(run)
    if data is not None:
        metrics = loaded.evaluate(data)
        report_skipped_dicts(metrics["skipped_files"])
        print_metrics_summary(metrics)
    console.print(f"wrote {write_report(loaded)}")
