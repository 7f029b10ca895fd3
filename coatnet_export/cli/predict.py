"""``coatnet-export predict``: classify many images into a Parquet file, locally or on Ray."""

from __future__ import annotations

from pathlib import Path

import click

from coatnet_export.cli.options import THREADS, check_json_path, json_option, write_json_to
from coatnet_export.console import Progress, render_table

SUMMARY_COLUMNS = (
    "engine",
    "workers",
    "threads_per_worker",
    "images",
    "errors",
    "resumed",
    "images_per_s",
    "wall_s",
)


@click.command()
@click.argument("export", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The Parquet file to write (one row per image).",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: worker processes on this machine; ray: Ray Data (pip extra `ray`).",
)
@click.option(
    "--workers",
    type=THREADS,
    help="Worker processes or Ray actors [default: local, one per core; ray, one per core "
    "but one left for reading].",
)
@click.option(
    "--threads-per-worker",
    type=THREADS,
    default=1,
    show_default=True,
    help="onnxruntime threads in each worker.",
)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--top-k", type=click.IntRange(1), default=5, show_default=True)
@click.option(
    "--model",
    type=click.Choice(["fp32", "int8"]),
    default="fp32",
    show_default=True,
    help="model.onnx or model.int8.onnx of the export.",
)
@click.option("--resume", is_flag=True, help="Keep the output's rows and skip their images.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--address", help="An existing Ray cluster (ray engine) [default: start one].")
@json_option("the summary")
def predict(
    export: Path,
    inputs: tuple[str, ...],
    output: Path,
    engine: str,
    workers: int | None,
    threads_per_worker: int,
    batch_size: int,
    top_k: int,
    model: str,
    resume: bool,
    force: bool,
    address: str | None,
    json_path: Path | None,
) -> None:
    """Classify images (files, folders, globs; with --engine ray also URIs) into Parquet.

    One row per image: path, top-k indices, labels and probabilities, the model's SHA-256 and
    an error (null, or why the image could not be read). Preprocessing and labels come from
    the export's metadata.
    """
    from coatnet_export.predict.run import PredictOptions, image_inputs, run_predict

    options = PredictOptions(
        export=export,
        inputs=inputs,
        output=output,
        engine=engine,
        workers=workers,
        threads=threads_per_worker,
        batch_size=batch_size,
        top_k=top_k,
        model=model,
        resume=resume,
        force=force,
        address=address,
    )
    if json_path and str(json_path) != "-":  # before the predictions are published
        from coatnet_export.output import check_apart

        check_json_path(json_path, [export], [("--output", output)])
        check_apart(json_path, "--json", scanned=image_inputs(options))
    outcome = run_predict(options, Progress())
    if json_path:
        write_json_to(json_path, outcome.as_dict())
        if str(json_path) == "-":
            return
    click.echo(render_table(outcome.rows(), SUMMARY_COLUMNS))
    click.echo(f"predictions -> {output}")
