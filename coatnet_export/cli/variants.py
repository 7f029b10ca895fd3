"""``coatnet-export variants``: the variant table, computed from the configurations (no torch)."""

from __future__ import annotations

from pathlib import Path

import click

from coatnet_export.cli.options import img_size_option, json_option, write_json_to
from coatnet_export.console import render_table


@click.command()
@img_size_option("The resolution the cost is computed at.", default=(224, 224))
@json_option("the table")
def variants(img_size: tuple[int, int], json_path: Path | None) -> None:
    """List the variants of both families (lucid's CoAtNet, timm's CoAtNet family) with
    parameters and multiply-accumulates (computed from the configuration, no weights)."""
    from coatnet_export.catalog import COLUMNS, VariantsOptions, run_variants

    outcome = run_variants(VariantsOptions(img_size=img_size))
    if json_path is not None:
        write_json_to(json_path, outcome.as_dict())
        if str(json_path) == "-":
            return
    click.echo(render_table(outcome.rows(), COLUMNS, outcome.headers()))
