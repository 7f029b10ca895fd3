"""``coatnet-export quantize``: int8 from an existing export."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from coatnet_export.cli.options import (
    THREADS,
    FloatListType,
    quant_options_from,
    quantize_options,
    runtime_options,
)
from coatnet_export.console import render_table
from coatnet_export.errors import GateFailed
from coatnet_export.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

if TYPE_CHECKING:
    from coatnet_export.quantize.pipeline import QuantOptions


def run_and_show_quantize(
    target: Path, options: QuantOptions, preprocessing: Preprocessing | None = None
) -> None:
    from coatnet_export.quantize.pipeline import run_quantize

    output, report = run_quantize(
        target, options, lambda text: click.echo(f"  {text}", err=True), preprocessing
    )
    click.echo(render_table(report.summary_rows(), ("metric", "value")))
    if report.lowest_sqnr:
        click.echo("\nlowest SQNR activations (dB):")
        click.echo(render_table(report.lowest_sqnr, ("tensor", "sqnr_db")))
    for note in report.notes:
        click.echo(f"note: {note}")
    gate = report.gate
    if not report.passed:
        raise GateFailed(
            f"int8 {gate['metric']} {gate['value']:.4f} is below the gate {gate['threshold']}; "
            f"{output} is written for inspection but should not be deployed"
        )
    click.echo(f"int8 model -> {output}")


@click.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "--mode", type=click.Choice(["static", "dynamic"]), default="static", show_default=True
)
@quantize_options
@click.option(
    "--size",
    type=(int, int),
    default=None,
    metavar="H W",
    help="Preprocessing size, for a model without coatnet-export metadata.",
)
@click.option("--mean", type=FloatListType(), default=None, help="With --size.")
@click.option("--std", type=FloatListType(), default=None, help="With --size.")
@click.option("--threads", type=THREADS, default=None)
@click.option(
    "--latency-runs",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    help="Timed batch-1 runs of each model for the speed-up.",
)
@runtime_options(precision=False)
def quantize(
    target: Path, mode: str, size, mean, std, latency_runs: int, runtime: str, **kw
) -> None:
    """Quantize an existing export (directory or model.onnx) to model.int8.onnx.

    Calibration runs in onnxruntime; the report's agreement (the gate) and latency run in
    --runtime."""
    preprocessing = None
    if size is not None:
        preprocessing = Preprocessing(size, mean or IMAGENET_MEAN, std or IMAGENET_STD)
    options = quant_options_from(kw, mode)
    options.latency_runs = latency_runs
    options.runtime = runtime
    run_and_show_quantize(target, options, preprocessing)
