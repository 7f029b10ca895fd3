"""``coatnet-export variants``: the variant table, computed from the configurations (no torch)."""

from __future__ import annotations

import json

import click

from coatnet_export.console import render_table


@click.command()
@click.option("--img-size", type=(int, int), default=(224, 224), show_default=True, metavar="H W")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def variants(img_size: tuple[int, int], as_json: bool) -> None:
    """List the variants with parameters and multiply-accumulates (computed, no weights)."""
    from models import VARIANTS, variant_cost

    rows = []
    for name, spec in VARIANTS.items():
        cost = variant_cost(spec, img_size)
        rows.append(
            {
                "variant": name,
                "parameters": cost.parameters,
                "gmacs": round(cost.macs / 1e9, 2),
                "heads": spec.num_heads,
                "blocks": "-".join(map(str, spec.num_blocks))
                if spec.tandem is None
                else f"{spec.num_blocks[0]}-{spec.num_blocks[1]}-{spec.num_blocks[2]}-"
                f"({spec.tandem.num_blocks[0]}C+{spec.tandem.num_blocks[1]}T)-"
                f"{spec.num_blocks[4]}",
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        row["parameters"] = f"{row['parameters']:,}"
    click.echo(
        render_table(
            rows,
            ("variant", "parameters", "gmacs", "heads", "blocks"),
            (
                "variant",
                "parameters",
                f"GMACs@{img_size[0]}x{img_size[1]}",
                "heads",
                "blocks S0-S4",
            ),
        )
    )
