"""The eight CoAtNet variants of lucid's model zoo, a registry that finds them, and factories.

The registry is plain Python; torch loads only when a model is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.config import ConfigError, Numerics, Tandem
from models.timm_config import TIMM_VARIANTS, TimmSpec, timm_spec_from_dict

if TYPE_CHECKING:
    import torch

    from models.coatnet import CoAtNet
    from models.timm_coatnet import TimmCoAtNet


class UnknownVariantError(ConfigError):
    """A variant name that the registry does not know."""


@dataclass(frozen=True)
class VariantSpec:
    """The fixed architecture of a named variant (resolution and classes are free)."""

    name: str
    num_blocks: tuple[int, ...]
    channels: tuple[int, ...]
    num_heads: int
    tandem: Tandem | None = None
    block_types: tuple[str, ...] = ("C", "C", "T", "T")
    lucid_parameters: int | None = None
    """Parameter count that lucid documents for this variant at 224 x 224 with 1000 classes."""
    family = "lucid"

    def build(
        self,
        img_size: Sequence[int] = (224, 224),
        num_classes: int = 1000,
        in_channels: int = 3,
        numerics: Numerics = Numerics(),
        device: str | torch.device | None = None,
    ) -> CoAtNet:
        """This architecture at a resolution. ``device="meta"`` allocates no weights."""
        import torch

        from models.coatnet import CoAtNet

        with torch.device(device or "cpu"):
            return CoAtNet(
                img_size,
                in_channels,
                self.num_blocks,
                self.channels,
                num_classes=num_classes,
                num_heads=self.num_heads,
                block_types=self.block_types,
                tandem=self.tandem,
                numerics=numerics,
            )

    def as_dict(self) -> dict:
        """Plain data, for metadata; :meth:`from_dict` reverses it."""
        return {
            "name": self.name,
            "num_blocks": list(self.num_blocks),
            "channels": list(self.channels),
            "num_heads": self.num_heads,
            "block_types": list(self.block_types),
            "tandem": None
            if self.tandem is None
            else {
                "num_blocks": list(self.tandem.num_blocks),
                "channels": list(self.tandem.channels),
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> VariantSpec:
        tandem = data.get("tandem")
        return cls(
            data["name"],
            tuple(data["num_blocks"]),
            tuple(data["channels"]),
            data["num_heads"],
            None
            if tandem is None
            else Tandem(tuple(tandem["num_blocks"]), tuple(tandem["channels"])),
            tuple(data.get("block_types", ("C", "C", "T", "T"))),
        )


VARIANTS: dict[str, VariantSpec] = {
    spec.name: spec
    for spec in (
        VariantSpec("coatnet_0", (2, 2, 3, 5, 2), (64, 96, 192, 384, 768), 32,
                    lucid_parameters=27_174_944),
        VariantSpec("coatnet_1", (2, 2, 6, 14, 2), (64, 96, 192, 384, 768), 32,
                    lucid_parameters=53_330_240),
        VariantSpec("coatnet_2", (2, 2, 6, 14, 2), (128, 128, 256, 512, 1024), 32,
                    lucid_parameters=82_516_096),
        VariantSpec("coatnet_3", (2, 2, 6, 14, 2), (192, 192, 384, 768, 1536), 32,
                    lucid_parameters=157_790_656),
        VariantSpec("coatnet_4", (2, 2, 12, 28, 2), (192, 192, 384, 768, 1536), 32,
                    lucid_parameters=277_301_632),
        VariantSpec("coatnet_5", (2, 2, 12, 28, 2), (192, 256, 512, 1280, 2048), 64,
                    lucid_parameters=770_124_608),
        VariantSpec("coatnet_6", (2, 2, 4, 8, 2), (192, 192, 384, 768, 2048), 128,
                    tandem=Tandem((8, 42), (768, 1536)), lucid_parameters=2_011_558_336),
        VariantSpec("coatnet_7", (2, 2, 4, 8, 2), (192, 256, 512, 1024, 3072), 128,
                    tandem=Tandem((8, 42), (1024, 2048)), lucid_parameters=3_107_978_688),
    )
}  # fmt: skip


FAMILIES: dict[str, Mapping[str, VariantSpec | TimmSpec]] = {
    "lucid": VARIANTS,
    "timm": TIMM_VARIANTS,
}
"""Every registered architecture by family: lucid's CoAtNet and timm's CoAtNet family."""


def variant_names() -> list[str]:
    """Names of the registered variants of every family, in order."""
    return [name for family in FAMILIES.values() for name in family]


def get_variant(name: str) -> VariantSpec | TimmSpec:
    """The spec of a variant of any family; raises :class:`UnknownVariantError` listing the
    valid names."""
    for family in FAMILIES.values():
        if name in family:
            return family[name]
    raise UnknownVariantError(
        f"unknown variant {name!r}; valid variants: {', '.join(variant_names())}"
    )


def architecture_from_dict(data: dict) -> VariantSpec | TimmSpec:
    """The architecture an export's metadata records (``as_dict`` of either family)."""
    if data.get("family") == "timm":
        return timm_spec_from_dict(data)
    return VariantSpec.from_dict(data)


def build_variant(
    name: str,
    img_size: Sequence[int] = (224, 224),
    num_classes: int = 1000,
    in_channels: int = 3,
    numerics: Numerics = Numerics(),
    device: str | torch.device | None = None,
) -> CoAtNet | TimmCoAtNet:
    """Build a named variant. ``device="meta"`` allocates no weights (for counting, planning)."""
    return get_variant(name).build(img_size, num_classes, in_channels, numerics, device)


def _factory(name: str):
    def factory(**kwargs) -> CoAtNet | TimmCoAtNet:
        return build_variant(name, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"Build {name} (keyword arguments as :func:`build_variant`)."
    return factory


coatnet_0 = _factory("coatnet_0")
coatnet_1 = _factory("coatnet_1")
coatnet_2 = _factory("coatnet_2")
coatnet_3 = _factory("coatnet_3")
coatnet_4 = _factory("coatnet_4")
coatnet_5 = _factory("coatnet_5")
coatnet_6 = _factory("coatnet_6")
coatnet_7 = _factory("coatnet_7")
