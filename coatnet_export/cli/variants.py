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
    if json_path is not None:
        write_json_to(json_path, rows)
        if str(json_path) == "-":
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
