"""``coatnet-export quantize``: int8 from an existing export."""

from __future__ import annotations

from pathlib import Path

import click

from coatnet_export.cli.options import FloatListType, quant_options_from, quantize_options
from coatnet_export.console import render_table
from coatnet_export.errors import GateFailed
from coatnet_export.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from coatnet_export.quantize.pipeline import QuantOptions


def run_and_show_quantize(
    target: Path, options: QuantOptions, preprocessing: Preprocessing | None = None
) -> None:
    from coatnet_export.quantize.pipeline import run_quantize

    output, report = run_quantize(
        target, options, lambda text: click.echo(f"  {text}", err=True), preprocessing
    )
    agreement = report.agreement
    rows = [
        {"metric": "top-1 agreement", "value": agreement.top1},
        {"metric": "top-5 agreement", "value": agreement.top5},
        {"metric": "min cosine", "value": agreement.min_cosine},
        {"metric": "max abs error", "value": agreement.max_abs},
        {"metric": "fp32 accuracy", "value": agreement.fp32_accuracy},
        {"metric": "int8 accuracy", "value": agreement.int8_accuracy},
        {
            "metric": "fp32 / int8 size (MiB)",
            "value": f"{report.sizes['fp32'] / 2**20:.1f} / {report.sizes['int8'] / 2**20:.1f} "
            f"({100 * report.sizes['int8'] / report.sizes['fp32']:.0f} %)",
        },
        {
            "metric": "fp32 / int8 p50 latency (ms)",
            "value": f"{report.latency_ms['fp32']:.2f} / {report.latency_ms['int8']:.2f} "
            f"(x{report.speedup:.2f})",
        },
        {"metric": "nodes kept in float", "value": len(report.excluded_nodes)},
        {"metric": "fallback steps", "value": len(report.fallback_steps)},
    ]
    click.echo(render_table([r for r in rows if r["value"] is not None], ("metric", "value")))
    if report.lowest_sqnr:
        click.echo("\nlowest SQNR tensors (dB):")
        click.echo(render_table(report.lowest_sqnr, ("tensor", "sqnr_db")))
    for note in report.notes:
        click.echo(f"note: {note}")
    if not report.passed:
        raise GateFailed(
            f"int8 top-1 agreement {agreement.top1:.4f} is below the gate "
            f"{options.min_top1}; {output} is written for inspection but should not "
            "be deployed"
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
@click.option("--threads", type=click.IntRange(1), default=None)
def quantize(target: Path, mode: str, size, mean, std, **kw) -> None:
    """Quantize an existing export (directory or model.onnx) to model.int8.onnx."""
    preprocessing = None
    if size is not None:
        preprocessing = Preprocessing(size, mean or IMAGENET_MEAN, std or IMAGENET_STD)
    run_and_show_quantize(target, quant_options_from(kw, mode), preprocessing)
