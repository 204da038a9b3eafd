"""`transferkit export`: the run's classifier as one file (ONNX fp32/int8 or TorchScript), checked before writing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from transferkit.cli.main import app
from transferkit.cli.output import JSON, print_json
from transferkit.fileio import check_suffix
from transferkit.options import EXPORT_SUFFIXES, check_export_choice
from transferkit.progress import console
from transferkit.runs.folder import check_run_folder


def print_report(report: dict) -> None:
    check = report["check"]
    console.print(f"max |Δprob| vs PyTorch {check['max_abs_diff']:.1e} on {check['images']} validation images")
    line = f"{check['decision']} agreement with PyTorch {check['agreement']:.1%}"
    if check["accuracy_torch"] is not None:
        line += f", accuracy {check['accuracy_export']:.4f} vs PyTorch {check['accuracy_torch']:.4f}"
    console.print(line)
    speed, eager = report["export_img_s"], report["eager_img_s"]
    engine = "TorchScript" if report["format"] == "torchscript" else "ONNX Runtime"
    engine += " int8" if report["int8"] else ""
    console.print(f"{engine} {speed:.1f} img/s vs eager PyTorch {eager:.1f} img/s (x{speed / eager:.2f})")
    size = f"{report['size_mb']:.1f} MB" + (f" in its {report['members']} members' files" if report["members"] else "")
    console.print(f"wrote {report['path']} ({size})")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    format_: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    int8: Annotated[bool, typer.Option("--int8", help="Static int8 quantization, calibrated on val images.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="File to write (RUN/model.onnx, model.int8.onnx, model.pt).")
    ] = None,
    json_out: JSON = False,
) -> None:
    """Export the classifier ([0, 1] pixels in, probabilities out); refused unless it matches PyTorch."""
    from dataclasses import asdict

    check_export_choice(format_, int8)
    if out is not None:
        check_suffix(out, EXPORT_SUFFIXES[format_])
    check_run_folder(run)
    from transferkit.export.onnx import export_run

    report = asdict(export_run(run, format_, int8, out, log=console.print))
    print_json(report) if json_out else print_report(report)
