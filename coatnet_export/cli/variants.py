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
    from models import FAMILIES, variant_cost

    rows = []
    for family, specs in FAMILIES.items():
        for name, spec in specs.items():
            cost = variant_cost(spec, img_size)
            rows.append(
                {
                    "variant": name,
                    "family": family,
                    "parameters": cost.parameters,
                    "gmacs": round(cost.macs / 1e9, 2),
                    "heads": spec.num_heads,
                    "blocks": _blocks(spec),
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
            ("variant", "family", "parameters", "gmacs", "heads", "blocks"),
            (
                "variant",
                "family",
                "parameters",
                f"GMACs@{img_size[0]}x{img_size[1]}",
                "heads",
                "blocks S0-S4",
            ),
        )
    )


def _blocks(spec) -> str:
    """Blocks per stage S0-S4: a tandem stage as (C+T), a timm stage as its block types."""
    if spec.family == "timm":
        stages = ["2"]
        for stage, depth in enumerate(spec.depths):
            kinds = spec.stage_blocks(stage)
            mixed = "+".join(f"{kinds.count(k)}{k}" for k in dict.fromkeys(kinds))
            stages.append(str(depth) if len(set(kinds)) == 1 else f"({mixed})")
        return "-".join(stages)
    if spec.tandem is None:
        return "-".join(map(str, spec.num_blocks))
    return (
        f"{spec.num_blocks[0]}-{spec.num_blocks[1]}-{spec.num_blocks[2]}-"
        f"({spec.tandem.num_blocks[0]}C+{spec.tandem.num_blocks[1]}T)-{spec.num_blocks[4]}"
    )
