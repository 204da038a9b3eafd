"""`transferkit demo`: train Lite0 on the solar-cell data and report test accuracy on the held-out split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from transferkit.cli.main import app
from transferkit.cli.output import JSON, print_json
from transferkit.progress import console


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (replaced if it holds a run).")] = Path(
        "runs/demo"
    ),
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    json_out: JSON = False,
) -> None:
    """Solar cells (elpv-dataset), functional vs defective: split, train on the 8 symmetries, evaluate on test."""
    import time

    from transferkit import api
    from transferkit.demo import DEMO_SETTINGS, write_elpv_csv

    start = time.perf_counter()
    data = write_elpv_csv(out.parent / f"{out.name}-data" / "elpv.csv")
    run = api.train(data, out, overwrite=True, quiet=quiet, **DEMO_SETTINGS)
    metrics = run.metrics
    if json_out:
        print_json(metrics)
        return
    console.print(
        f"test accuracy {metrics['accuracy']:.4f} (n={metrics['n']}), AUC {metrics['auc']:.4f} "
        f"in {time.perf_counter() - start:.0f}s; published fine-tuned CNN: 0.8842"
    )
    console.print(f"run folder: {out} (open {out / 'report.html'} in a browser)")
