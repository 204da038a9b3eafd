"""`transferkit backbones` and `transferkit imagenet`: what can be used, and the untouched pretrained model."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table

from transferkit.cli.main import app
from transferkit.cli.output import JSON, print_json, print_predictions, report_skipped
from transferkit.options import DEFAULT_BACKBONE
from transferkit.progress import console


def backbone_rows() -> list[dict]:
    import timm

    from transferkit.models.registry import BACKBONES, count_parameters, has_offline_weights

    rows = []
    for spec in BACKBONES.values():
        model_cfg = timm.models.get_pretrained_cfg(spec.timm_name)
        params = count_parameters(spec.timm_name)
        rows.append(
            {
                "name": spec.name,
                "timm_name": spec.timm_name,
                "parameters": params,
                "size_mb": round(params * 4 / 2**20, 1),
                "input_size": int(model_cfg.input_size[-1]),
                "offline_weights": has_offline_weights(spec),
                "imagenet_top1": spec.imagenet_top1,
                "default": spec.name == DEFAULT_BACKBONE,
            }
        )
    return rows


@app.command()
def backbones(json_out: JSON = False) -> None:
    """List known backbones: parameters, size, input size, offline weights now, ImageNet top-1."""
    rows = backbone_rows()
    if json_out:
        print_json(rows)
        return
    # names are what users type: never cut or wrapped, whatever the width (80 columns, a pipe); the rest is narrow
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("name", no_wrap=True, min_width=max(len(row["name"]) + 1 for row in rows))
    for header in ("params M", "MB", "input", "offline", "top-1"):
        table.add_column(header, justify="right" if header != "offline" else "left", no_wrap=True)
    for row in rows:
        table.add_row(
            row["name"] + ("*" if row["default"] else ""),
            f"{row['parameters'] / 1e6:.1f}",
            f"{row['size_mb']:.0f}",
            str(row["input_size"]),
            "yes" if row["offline_weights"] else "no",
            f"{row['imagenet_top1']:.1f}" if row["imagenet_top1"] else "-",
        )
    console.print(table)
    console.print("* the default. offline: ImageNet weights installed here; top-1: ImageNet accuracy (%).")
    console.print("Any other timm model name works too, with hub weights when online or --weights FILE.")


@app.command()
def imagenet(
    images: Annotated[list[str], typer.Argument(help="Images or folders of images.")],
    backbone: Annotated[str, typer.Option(help="Backbone name.")] = DEFAULT_BACKBONE,
    weights: Annotated[str | None, typer.Option(help="ImageNet weights file (.safetensors/.pth).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=1000)] = 5,
    json_out: JSON = False,
) -> None:
    """Top-5 ImageNet classes from the untouched pretrained network."""
    import torch
    from timm.data import ImageNetInfo

    from transferkit.data.transforms import Preprocess, eval_transform
    from transferkit.models.registry import create_imagenet_model, get_backbone
    from transferkit.prediction import collect_images, top_predictions
    from transferkit.runs.run import infer_logits

    paths, skipped = collect_images(images)
    report_skipped(skipped)
    model, _ = create_imagenet_model(get_backbone(backbone), weights)
    transform = eval_transform(Preprocess.from_timm_config(model.pretrained_cfg))
    probs = torch.softmax(infer_logits(model, paths, transform), dim=1)
    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in range(1000)]
    results = top_predictions(paths, probs, names, top_k)
    print_json(results) if json_out else print_predictions(results)
