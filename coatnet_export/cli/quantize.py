"""``coatnet-export quantize``: int8 from an existing export."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from coatnet_export.cli.options import (
    THREADS,
    FloatListType,
    SizeType,
    check_json_path,
    img_size_option,
    json_option,
    quant_options_from,
    quantize_options,
    runtime_options,
    write_json_to,
)
from coatnet_export.console import Progress, render_table
from coatnet_export.errors import GateFailed
from coatnet_export.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

if TYPE_CHECKING:
    from coatnet_export.quantize import QuantOptions, QuantOutcome


def quantize_and_show(
    options: QuantOptions, progress: Progress, json_path: Path | None = None
) -> None:
    """Run the quantization, write ``--json``, print the table and notes (``--json -``: the
    JSON instead); a failed gate exits 1."""
    from coatnet_export.quantize import run_quantize

    outcome = run_quantize(options, progress)
    if json_path is not None:
        write_json_to(json_path, outcome.as_dict())
    show(outcome, table=json_path is None or str(json_path) != "-")


def show(outcome: QuantOutcome, table: bool) -> None:
    report = outcome.report
    if table:
        click.echo(render_table(outcome.rows(), ("metric", "value")))
        if report.lowest_sqnr:
            click.echo("\nlowest SQNR activations (dB):")
            click.echo(render_table(report.lowest_sqnr, ("tensor", "sqnr_db")))
    for note in report.notes:
        click.echo(f"note: {note}", err=not table)
    gate = report.gate
    if not outcome.passed:
        raise GateFailed(
            f"int8 {gate['metric']} {gate['value']:.4f} is below the gate {gate['threshold']}; "
            f"{outcome.model} is written for inspection but should not be deployed"
        )
    click.echo(f"int8 model -> {outcome.model}", err=not table)


@click.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "--mode", type=click.Choice(["static", "dynamic"]), default="static", show_default=True
)
@quantize_options
@img_size_option("Preprocessing size, for a model without coatnet-export metadata.")
@click.option("--size", "size_alias", type=(SizeType(), SizeType()), default=None, hidden=True)
@click.option("--mean", type=FloatListType(), default=None, help="With --img-size.")
@click.option("--std", type=FloatListType(), default=None, help="With --img-size.")
@click.option("--threads", type=THREADS, default=None)
@click.option(
    "--latency-runs",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    help="Timed batch-1 runs of each model for the speed-up.",
)
@click.option("--quiet", is_flag=True, help="No progress lines.")
@json_option("the report (quantization.json's content and the model's path)")
@runtime_options(precision=False)
def quantize(
    target: Path,
    mode: str,
    img_size,
    size_alias,
    mean,
    std,
    latency_runs: int,
    runtime: str,
    quiet: bool,
    json_path: Path | None,
    **kw,
) -> None:
    """Quantize an existing export (directory or model.onnx) to model.int8.onnx.

    Calibration runs in onnxruntime; the report's agreement (the gate) and latency run in
    --runtime."""
    size = img_size or size_alias  # --size: the old spelling, kept hidden
    preprocessing = None
    if size is not None:
        preprocessing = Preprocessing(size, mean or IMAGENET_MEAN, std or IMAGENET_STD)
    options = quant_options_from(
        kw,
        mode,
        target,
        preprocessing=preprocessing,
        latency_runs=latency_runs,
        runtime=runtime,
    )
    if json_path is not None:
        check_json_path(json_path, [target, *filter(None, [kw["calibration_data"]])])
    quantize_and_show(options, Progress(enabled=not quiet), json_path)
