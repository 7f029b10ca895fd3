"""``coatnet-export validate``: re-check an export against its PyTorch reference."""

from __future__ import annotations

from pathlib import Path

import click

from coatnet_export.cli.options import gate_options, runtime_options, validation_inputs_options
from coatnet_export.console import Progress, render_table
from coatnet_export.errors import GateFailed, writing
from coatnet_export.gates import RESULT_COLUMNS, Gates
from coatnet_export.metadata import write_json
from coatnet_export.output import check_side_file


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    help="The checkpoint the model was exported from: a file or a timm model folder "
    "(default: the seeded weights recorded in the model).",
)
@validation_inputs_options
@gate_options
@runtime_options()
def validate(
    model: Path,
    checkpoint: Path | None,
    images,
    samples,
    report,
    threads,
    max_rel_error,
    min_top1,
    runtime: str,
    precision: str,
) -> None:
    """Validate an existing export (directory or .onnx file) against PyTorch, run in
    onnxruntime or OpenVINO (--runtime)."""
    from coatnet_export.revalidate import ValidateOptions, run_validate
    from coatnet_export.runtimes import check_runtime

    check_runtime(runtime, precision)
    if report:
        check_side_file(report, "--report", [model, *filter(None, [checkpoint]), *images])
    options = ValidateOptions(
        model=model,
        checkpoint=checkpoint,
        images=tuple(images),
        samples=samples,
        gates=Gates(max_rel_error, min_top1),
        threads=threads,
        runtime=runtime,
        precision=precision,
    )
    outcome = run_validate(options, Progress())
    click.echo(render_table(outcome.rows(), RESULT_COLUMNS))
    for warning in outcome.warnings:
        click.echo(f"warning: {warning}")
    if report:
        with writing(report, "--report"):
            write_json(report, outcome.as_dict())
    if not outcome.passed:
        raise GateFailed(f"{outcome.model_path} does not match its PyTorch reference")
    click.echo(f"{outcome.model_path} matches its PyTorch reference")
