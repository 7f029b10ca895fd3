"""``coatnet-export info``: what an export holds."""

from __future__ import annotations

from pathlib import Path

import click

from coatnet_export.cli.options import check_json_path, json_option, write_json_to
from coatnet_export.console import render_table


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@json_option("the description")
def info(model: Path, json_path: Path | None) -> None:
    """Show what an export holds: metadata, inputs, outputs, size, and every artefact."""
    from coatnet_export.describe import InfoOptions, run_info

    if json_path is not None:
        check_json_path(json_path, [model])
    outcome = run_info(InfoOptions(model=model))
    for warning in outcome.warnings:
        click.echo(f"warning: {warning}", err=True)
    if json_path is not None:
        write_json_to(json_path, outcome.as_dict())
        if str(json_path) == "-":
            return
    click.echo(render_table(outcome.rows(), ("field", "value")))
    if outcome.artefacts:
        click.echo("\nartefacts:")
        click.echo(render_table(outcome.artefact_rows(), ("file", "what it is for")))
