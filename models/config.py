"""The configuration of a CoAtNet, without torch: widths, numerics, and their checks.

Everything here is plain Python so that listing variants or checking options never loads torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

DIM_HEAD = 32
"""Width of one attention head; lucid sizes attention as 32 x num_heads in every block."""

STAGE_STRIDES = (2, 4, 8, 16, 32)
"""Downsampling factor of each stage S0..S4 relative to the input."""


class ConfigError(ValueError):
    """An invalid CoAtNet configuration."""


@dataclass(frozen=True)
class Numerics:
    """Numerical conventions of the model; the defaults are the seed document's mathematics.

    lucid departs from them in three places; setting all three (``Numerics.lucid()``)
    reproduces a lucid-trained network exactly.
    """

    gelu_tanh: bool = False
    """GELU with the tanh approximation instead of the exact erf form."""
    maxpool_zero_pad: bool = False
    """Pad the 3x3/2 max-pool with zeros instead of -inf."""
    scale_multiply: bool = False
    """Multiply attention scores by sqrt(d_head) instead of dividing by it."""

    @classmethod
    def lucid(cls) -> Numerics:
        """The conventions of lucid's CoAtNet code."""
        return cls(gelu_tanh=True, maxpool_zero_pad=True, scale_multiply=True)

    def as_dict(self) -> dict[str, bool]:
        """Plain dictionary, for manifests and metadata."""
        return asdict(self)


@dataclass(frozen=True)
class Tandem:
    """Stage S3 of coatnet_6/7: MBConv blocks, then Transformer blocks, all at 1/16."""

    num_blocks: tuple[int, int]
    channels: tuple[int, int]


def check_config(
    img_size: Sequence[int],
    in_channels: int,
    num_blocks: Sequence[int],
    channels: Sequence[int],
    num_classes: int,
    num_heads: int,
    block_types: Sequence[str],
) -> None:
    """Raise :class:`ConfigError`, saying what to change, for a configuration that cannot be
    built."""
    if len(img_size) != 2:
        raise ConfigError(f"img_size must be (height, width), got {tuple(img_size)}")
    bad = [s for s in img_size if s <= 0 or s % 32]
    if bad:
        nearest = tuple(max(32, round(s / 32) * 32) for s in img_size)
        raise ConfigError(
            f"img_size {tuple(img_size)}: height and width must be positive multiples of 32 "
            f"(the network downsamples by 32); try {nearest}"
        )
    for name, values in (("num_blocks", num_blocks), ("channels", channels)):
        if len(values) == 4:
            raise ConfigError(
                f"{name} has 4 entries; CoAtNet needs 5, one per stage S0..S4 "
                "(the seed example omits the S0 stem: prepend it, e.g. [2, 2, 2, 6, 2])"
            )
        if len(values) != 5:
            raise ConfigError(f"{name} must have 5 entries (stages S0..S4), got {len(values)}")
        if any(v < 1 for v in values):
            raise ConfigError(f"every entry of {name} must be at least 1, got {list(values)}")
    if len(block_types) != 4:
        raise ConfigError(
            f"block_types must have 4 entries (stages S1..S4), got {len(block_types)}"
        )
    unknown = [b for b in block_types if b not in ("C", "T")]
    if unknown:
        raise ConfigError(f"unknown block type(s) {unknown}: use 'C' (MBConv) or 'T' (Transformer)")
    for name, value in (
        ("in_channels", in_channels),
        ("num_classes", num_classes),
        ("num_heads", num_heads),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
