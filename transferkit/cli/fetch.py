"""`transferkit fetch`: a dataset folder from a CSV of image URLs, with a report of what failed and why."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from transferkit.cli.main import app, fail
from transferkit.cli.output import JSON, print_json
from transferkit.progress import Reporter, console, print_warning

_FAILURES_SHOWN = 10  # the summary fits one screen; the report has them all


def print_summary(report: dict, report_path: Path) -> None:
    counts = report["counts"]
    console.print(
        f"{counts['rows']} rows: {counts['stored']} images stored, {counts['duplicates']} duplicates, "
        f"{counts['failed']} failed ({counts['fetched']} fetched now, {counts['from_earlier_runs']} settled by "
        "earlier runs)"
    )
    for failure in report["failures"][:_FAILURES_SHOWN]:
        print_warning("failed", f"line {failure['line']} {failure['url']}: {failure['reason']}")
    if len(report["failures"]) > _FAILURES_SHOWN:
        console.print(f"... and {len(report['failures']) - _FAILURES_SHOWN} more failures")
    console.print(f"dataset in {report['out']}, report in {report_path}")


@app.command()
def fetch(
    csv_file: Annotated[Path, typer.Argument(help="CSV with a header url,label[,split].")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder: OUT/[split/]label/<hash>.<ext>.")],
    workers: Annotated[int, typer.Option(min=1, help="Downloads at the same time.")] = 8,
    timeout: Annotated[float, typer.Option(min=0.01, help="Seconds for each connect or read.")] = 10.0,
    max_time: Annotated[float, typer.Option(min=0.01, help="Seconds for one URL in all, retries included.")] = 60.0,
    max_mb: Annotated[float, typer.Option(min=0.001, help="Largest body accepted, in MB.")] = 20.0,
    retries: Annotated[int, typer.Option(min=0, help="Retries after a connection error, 5xx or 429.")] = 3,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Also retry URLs that failed for good (404, not an image) before.")
    ] = False,
    json_out: JSON = False,
) -> None:
    """Download the images of a URL list into a dataset folder; re-running resumes where the last run stopped."""
    from transferkit.fetch import REPORT_NAME, FetchOptions, Limits, fetch_dataset

    limits = Limits(timeout=timeout, max_time=max_time, max_mb=max_mb, retries=retries)
    options = FetchOptions(workers=workers, limits=limits, retry_failed=retry_failed)
    report = fetch_dataset(csv_file, out, options, Reporter())
    print_json(report) if json_out else print_summary(report, out / REPORT_NAME)
    if report["counts"]["failed"] == report["counts"]["rows"]:
        fail(f"every row failed; the reasons are in {out / REPORT_NAME}")  # exit 1, not 2: the input was usable
        raise typer.Exit(1)
