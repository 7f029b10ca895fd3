"""The variants command's data flow: every architecture of both families with its parameters
and multiply-accumulates, computed from the configurations (no torch, no weights)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models import FAMILIES, VariantSpec, variant_cost
from models.timm_config import TimmSpec

COLUMNS = ("variant", "family", "parameters", "gmacs", "heads", "blocks")


@dataclass(frozen=True, kw_only=True)
class VariantsOptions:
    """What ``coatnet-export variants`` was asked for."""

    img_size: tuple[int, int] = (224, 224)
    """The resolution the multiply-accumulates are computed at."""


@dataclass(frozen=True)
class VariantsOutcome:
    """One row per architecture, in the families' order."""

    img_size: tuple[int, int]
    variants: list[dict[str, Any]]

    def rows(self) -> list[dict[str, Any]]:
        """The rows for reading: parameters with thousands separators."""
        return [{**row, "parameters": f"{row['parameters']:,}"} for row in self.variants]

    def headers(self) -> tuple[str, ...]:
        height, width = self.img_size
        return (
            "variant",
            "family",
            "parameters",
            f"GMACs@{height}x{width}",
            "heads",
            "blocks S0-S4",
        )

    def as_dict(self) -> list[dict[str, Any]]:
        return self.variants


def run_variants(options: VariantsOptions) -> VariantsOutcome:
    """Every variant of both families at ``options.img_size``."""
    rows = []
    for family, specs in FAMILIES.items():
        for name, spec in specs.items():
            cost = variant_cost(spec, options.img_size)
            rows.append(
                {
                    "variant": name,
                    "family": family,
                    "parameters": cost.parameters,
                    "gmacs": round(cost.macs / 1e9, 2),
                    "heads": spec.num_heads,
                    "blocks": blocks_per_stage(spec),
                }
            )
    return VariantsOutcome(options.img_size, rows)


def blocks_per_stage(spec: VariantSpec | TimmSpec) -> str:
    """Blocks per stage S0-S4: a tandem stage as (C+T), a timm stage as its block types."""
    if isinstance(spec, TimmSpec):
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
