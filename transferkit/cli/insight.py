"""`transferkit explain`, `similarity`, `embed` and `search`: what a model looks at, and what it finds alike."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from transferkit.cli.main import app
from transferkit.cli.output import (
    CACHE_DIR,
    JSON,
    NO_CACHE,
    check_paths,
    default_run_folder,
    print_json,
    report_skipped,
)
from transferkit.errors import UserError
from transferkit.fileio import check_suffix, output_folder
from transferkit.insight.embedding_files import check_embeddings_path
from transferkit.progress import console
from transferkit.runs.folder import check_run_folder

if TYPE_CHECKING:
    from transferkit.insight.similarity import Embedder, EmbeddingSource
    from transferkit.runs.run import Run

RUN = Annotated[Path, typer.Argument(help="Run folder.")]
CLASS = Annotated[str | None, typer.Option("--class", help="Class to explain (default: the predicted one).")]


def load_run(path: Path, ensemble: bool = False) -> Run:
    """The run (its folder already checked by the command, before PyTorch loaded); an ensemble only where the command
    handles one (explain), else its one-line refusal."""
    from transferkit.runs.run import Run, open_run

    return open_run(path) if ensemble else Run(path)


def embedder(source: EmbeddingSource, cache_dir: str | None, no_cache: bool) -> Embedder:
    from transferkit.features.cache import cache_root
    from transferkit.insight.similarity import Embedder
    from transferkit.progress import Reporter

    return Embedder(source, cache_root(not no_cache, cache_dir), Reporter())


def readable_images(inputs: list[str]) -> list[str]:
    """Images from files and folders; unreadable ones are reported and left out (none at all: a UserError)."""
    from transferkit.prediction import collect_images

    paths, skipped = collect_images(inputs)
    report_skipped(skipped)
    return paths


@app.command()
def explain(
    run: RUN,
    images: Annotated[list[str], typer.Argument(help="Images or folders of images.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the overlay PNGs.",
                                             show_default="runs/NAME-explain, NAME being the run's")] = None,
    class_name: CLASS = None,
    json_out: JSON = False,
) -> None:
    """Grad-CAM overlays: where in each image the evidence for a class lies."""
    check_run_folder(run)
    paths = readable_images(images)  # wrong paths answer before PyTorch is imported
    from transferkit.insight.explain import class_index, explain_files

    model = load_run(run, ensemble=True)
    target = class_index(model, class_name) if class_name is not None else None
    out = out or default_run_folder(str(run), "-explain")
    output_folder(out)
    results = explain_files(model, paths, out, target)
    if json_out:
        print_json(results)
        return
    for result in results:
        explained = "" if result["explained"] == result["label"] else f" (explaining {result['explained']})"
        print(f"{result['path']}: {result['label']} {result['probability']:.3f}{explained} -> {result['overlay']}")


def embedding_source(inputs: list[str], backbone: str | None, weights: str | None) -> tuple[EmbeddingSource, list]:
    """RUN IMG... or, with --backbone, IMG... alone: the network to embed with, and the image arguments."""
    if backbone is None:
        if weights is not None:
            raise UserError("--weights needs --backbone (a run folder holds its own weights)")
        if len(inputs) < 2:
            raise UserError("give a run folder and then images or folders (or --backbone NAME and images)")
        check_run_folder(Path(inputs[0]))
        from transferkit.insight.similarity import run_source

        return run_source(load_run(Path(inputs[0]))), inputs[1:]
    if (Path(inputs[0]) / "meta.json").is_file():
        raise UserError(f"give either a run folder ({inputs[0]}) or --backbone, not both")
    from transferkit.insight.similarity import backbone_source

    return backbone_source(backbone, weights), inputs


@app.command()
def similarity(
    inputs: Annotated[list[str], typer.Argument(help="RUN then images or folders; only images with --backbone.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Heatmap PNG to write.")],
    backbone: Annotated[str | None, typer.Option(help="Embed with this untouched ImageNet backbone instead.")] = None,
    weights: Annotated[str | None, typer.Option(help="ImageNet weights file for --backbone.")] = None,
    cache_dir: CACHE_DIR = None,
    no_cache: NO_CACHE = False,
    json_out: JSON = False,
) -> None:
    """Cosine similarity between the images' embeddings, as a matrix and an annotated heatmap."""
    check_suffix(out, (".png",))
    source, images = embedding_source(inputs, backbone, weights)
    from transferkit.insight.similarity import cosine_matrix, plot_similarity

    paths = readable_images(images)
    output_folder(out.parent)
    matrix = cosine_matrix(embedder(source, cache_dir, no_cache)(paths))
    plot_similarity(matrix, paths, out)
    if json_out:
        print_json({"paths": paths, "matrix": matrix.round(6).tolist()})
    else:
        console.print(f"wrote {out}: cosine similarities of {len(paths)} images")


@app.command()
def embed(
    run: RUN,
    data: Annotated[str, typer.Argument(help="Dataset folder or CSV (labels kept), or a folder of images.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write: .npz, or .parquet (needs pyarrow).")],
    cache_dir: CACHE_DIR = None,
    no_cache: NO_CACHE = False,
) -> None:
    """Embeddings of every image with its path and label, for your own analysis (UMAP, kNN, deduplication)."""
    check_run_folder(run)
    check_paths(data)
    check_embeddings_path(out)
    from transferkit.insight.similarity import labelled_images, run_source, write_embeddings

    source = run_source(load_run(run))
    paths, labels, skipped = labelled_images(data)
    report_skipped(skipped)
    output_folder(out.parent)
    embeddings = embedder(source, cache_dir, no_cache)(paths)
    write_embeddings(out, embeddings, paths, labels)
    console.print(f"wrote {out}: {embeddings.shape[0]} embeddings of {embeddings.shape[1]} dimensions")


@app.command()
def search(
    run: RUN,
    query: Annotated[str, typer.Argument(help="The image to find neighbours of.")],
    gallery: Annotated[list[str], typer.Option(help="Images or folders to search (repeatable).")],
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="How many neighbours to list.")] = 5,
    cache_dir: CACHE_DIR = None,
    no_cache: NO_CACHE = False,
    json_out: JSON = False,
) -> None:
    """The gallery images most similar to a query image (cosine of embeddings); gallery embeddings are cached."""
    if Path(query).is_dir():
        raise UserError(f"the query must be one image file, not a folder: {query}")
    check_run_folder(run)
    [query_path] = readable_images([query])
    gallery_paths = list(dict.fromkeys(readable_images(gallery)))  # overlapping --gallery folders list a file once
    from transferkit.insight.similarity import nearest, run_source

    source = run_source(load_run(run))
    # One pass for gallery and query: the query costs nothing more when it is in the (cached) gallery.
    embeddings = embedder(source, cache_dir, no_cache)(gallery_paths + [query_path])
    neighbours = nearest(embeddings[-1], embeddings[:-1], k)
    results = [{"rank": rank, "path": gallery_paths[row], "similarity": score}
               for rank, (row, score) in enumerate(neighbours, start=1)]
    if json_out:
        print_json(results)
        return
    for result in results:
        print(f"{result['rank']:>3}  {result['similarity']:.4f}  {result['path']}")
