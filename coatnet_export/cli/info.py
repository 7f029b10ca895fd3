"""``coatnet-export info``: what an export holds."""

from __future__ import annotations

import json
from pathlib import Path

import click

from coatnet_export.console import render_table


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(model: Path, as_json: bool) -> None:
    """Show what an export holds: metadata, inputs, outputs, size, and every artefact."""
    from coatnet_export.describe import describe

    description = describe(model)
    for warning in description.get("int8_cpu_warnings", []):
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(description, indent=2))
        return
    artefacts = description.pop("artefacts", {})
    rows = [
        {"field": k, "value": json.dumps(v) if isinstance(v, (list, dict)) else v}
        for k, v in description.items()
    ]
    click.echo(render_table(rows, ("field", "value")))
    if artefacts:
        click.echo("\nartefacts:")
        click.echo(
            render_table(
                [{"file": name, "what it is for": what} for name, what in artefacts.items()],
                ("file", "what it is for"),
            )
        )
