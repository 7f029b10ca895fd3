"""timm's CoAtNet family as data: one table of small frozen dataclasses, without torch.

Every CoAtNet-family architecture of timm's ``maxxvit.py`` (the ``_rw`` models, ``bn``,
``rmlp``, ``cc``, ``coatnext`` and the paper-like ``coatnet_N_224``) is one :class:`TimmSpec`
row in :data:`TIMM_VARIANTS`. The model itself is :mod:`models.timm_coatnet`; its state-dict
keys are timm's, so a timm checkpoint loads as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from models.config import DIM_HEAD, ConfigError, Numerics

if TYPE_CHECKING:
    import torch

    from models.timm_coatnet import TimmCoAtNet

FAMILY = "timm"
Pool = Literal["avg2", "max"]


@dataclass(frozen=True)
class ConvBlockConfig:
    """The convolution blocks of a model: timm's MbConvBlock, or ConvNeXtBlock (coatnext)."""

    convnext: bool = False
    expand_output: bool = True
    """Hidden width 4 x the output width (paper) or 4 x the input width (``_rw``)."""
    stride_in_pool: bool = False
    """Stride by pooling after the pre-norm (``stride_mode='pool'``), else in the depthwise conv."""
    pool: Pool = "avg2"
    pre_norm_act: bool = False
    output_bias: bool = True
    se_early: bool = False
    """Squeeze-excite between the depthwise conv and its norm (before ``norm2``)."""
    se_act: Literal["relu", "silu"] = "silu"
    se_ratio: float = 0.25
    act: Literal["gelu", "silu"] = "gelu"
    layer_scale: float | None = None
    """ConvNeXt blocks only: their ``ls.gamma`` (initial value; the checkpoint's wins)."""


@dataclass(frozen=True)
class TransformerBlockConfig:
    """The transformer blocks: timm's TransformerBlock2d with a global relative position."""

    expand_first: bool = True
    """Attention width = output width (paper) or input width (``_rw``)."""
    shortcut_bias: bool = True
    pool: Pool = "avg2"
    batch_norm: bool = False
    """BatchNorm (eps 1e-6) instead of LayerNorm in the blocks and the final norm (``bn_0``)."""
    rel_pos_mlp: int | None = None
    """Hidden width of the relative-position MLP (``rmlp``); None: a learned bias table."""
    layer_scale: float | None = None


@dataclass(frozen=True)
class Preprocessing:
    """The ``pretrained_cfg`` defaults of the published weights (config.json overrides them)."""

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_pct: float = 0.95
    crop_mode: str = "center"
    interpolation: str = "bicubic"


IMAGENET = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class TimmSpec:
    """One timm CoAtNet architecture (resolution and classes are free)."""

    name: str
    embed_dim: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    stem_width: tuple[int, int]
    conv: ConvBlockConfig
    transformer: TransformerBlockConfig
    block_types: tuple[tuple[str, ...], ...] = (("C",), ("C",), ("T",), ("T",))
    """Per stage: the block types, the last repeated (timm's ``extend_tuple``)."""
    head_hidden: int | None = None
    """Paper-like head: pool, norm, a tanh pre-logits layer of this width, then fc."""
    img_size: tuple[int, int] = (224, 224)
    """The resolution the published weights were trained at."""
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    family: str = FAMILY

    @property
    def stem_act(self) -> str:
        return self.conv.act

    def stage_blocks(self, stage: int) -> tuple[str, ...]:
        """The type ('C' or 'T') of every block of stage 0..3."""
        types, depth = self.block_types[stage], self.depths[stage]
        return types[:depth] + (types[-1],) * (depth - len(types))

    def attention_heads(self, dim_in: int, dim_out: int) -> int:
        """Heads of a transformer block from ``dim_in`` to ``dim_out`` (32 channels each)."""
        return (dim_out if self.transformer.expand_first else dim_in) // DIM_HEAD

    @property
    def num_heads(self) -> int:
        """The most heads of any transformer block (for memory estimates)."""
        heads = [
            self.attention_heads(dim_in, dim_out)
            for _, kind, dim_in, dim_out, _ in self.stage_plan()
            if kind == "T"
        ]
        return max(heads, default=1)

    @property
    def channels(self) -> tuple[int, ...]:
        """Output width of the stem and of each stage (as a lucid spec lists them)."""
        return (self.stem_width[1], *self.embed_dim)

    def stage_plan(self) -> list[tuple[int, str, int, int, int]]:
        """(stage 1..4, block type, input width, output width, blocks) of each run of blocks of
        one type, in forward order."""
        plan: list[tuple[int, str, int, int, int]] = []
        dim_in = self.stem_width[1]
        for stage, dim_out in enumerate(self.embed_dim):
            for kind in self.stage_blocks(stage):
                if plan and plan[-1][0] == stage + 1 and plan[-1][1] == kind:
                    s, k, a, b, n = plan[-1]
                    plan[-1] = (s, k, a, b, n + 1)
                else:
                    plan.append((stage + 1, kind, dim_in, dim_out, 1))
                dim_in = dim_out
        return plan

    def check_size(self, img_size: Sequence[int]) -> None:
        """Raise :class:`ConfigError` for a resolution the network cannot take."""
        if len(img_size) != 2 or any(s <= 0 or s % 32 for s in img_size):
            nearest = tuple(max(32, round(s / 32) * 32) for s in img_size)
            raise ConfigError(
                f"img_size {tuple(img_size)}: height and width must be positive multiples of 32 "
                f"(the network downsamples by 32); try {nearest}"
            )

    def build(
        self,
        img_size: Sequence[int] | None = None,
        num_classes: int = 1000,
        in_channels: int = 3,
        numerics: Numerics = Numerics(),
        device: str | torch.device | None = None,
    ) -> TimmCoAtNet:
        """This architecture at a resolution. ``device="meta"`` allocates no weights."""
        import torch

        from models.timm_coatnet import TimmCoAtNet

        if numerics != Numerics():
            raise ConfigError("timm models have exact GELU and divided scores (default numerics)")
        requested = tuple(img_size or self.img_size)
        self.check_size(requested)
        with torch.device(device or "cpu"):
            return TimmCoAtNet(self, (requested[0], requested[1]), num_classes, in_channels)

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for metadata; :func:`timm_spec_from_dict` reverses it."""
        return asdict(self)


def make_divisible(value: float, divisor: int = 8) -> int:
    """timm's rounding of a hidden width to a multiple of ``divisor``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def timm_spec_from_dict(data: dict) -> TimmSpec:
    """The spec that :meth:`TimmSpec.as_dict` wrote."""
    return TimmSpec(
        name=data["name"],
        embed_dim=tuple(data["embed_dim"]),
        depths=tuple(data["depths"]),
        stem_width=tuple(data["stem_width"]),
        conv=ConvBlockConfig(**data["conv"]),
        transformer=TransformerBlockConfig(**data["transformer"]),
        block_types=tuple(tuple(t) for t in data["block_types"]),
        head_hidden=data.get("head_hidden"),
        img_size=tuple(data.get("img_size", (224, 224))),
        preprocessing=Preprocessing(**_plain(data["preprocessing"])),
    )


# The three configuration families of timm's maxxvit.py that CoAtNets use
def _rw_coat(
    stride_in_pool: bool = True,
    pool: Pool = "avg2",
    se_early: bool = False,
    se_act: Literal["relu", "silu"] = "relu",
    shortcut_bias: bool = True,
    batch_norm: bool = False,
    layer_scale: float | None = None,
    rel_pos_mlp: int | None = None,
) -> dict[str, Any]:
    conv = ConvBlockConfig(
        expand_output=False,
        stride_in_pool=stride_in_pool,
        pool=pool,
        pre_norm_act=True,
        output_bias=False,
        se_early=se_early,
        se_act=se_act,
        act="silu",
    )
    transformer = TransformerBlockConfig(
        expand_first=False,
        shortcut_bias=shortcut_bias,
        pool=pool,
        batch_norm=batch_norm,
        rel_pos_mlp=rel_pos_mlp,
        layer_scale=layer_scale,
    )
    return {"conv": conv, "transformer": transformer}


def _rw_max(stride_in_pool: bool = False, rel_pos_mlp: int | None = None) -> dict[str, Any]:
    conv = ConvBlockConfig(expand_output=False, stride_in_pool=stride_in_pool, act="silu")
    transformer = TransformerBlockConfig(expand_first=False, rel_pos_mlp=rel_pos_mlp)
    return {"conv": conv, "transformer": transformer}


def _next() -> dict[str, Any]:
    conv = ConvBlockConfig(convnext=True, expand_output=False, layer_scale=1e-5)
    return {"conv": conv, "transformer": TransformerBlockConfig(expand_first=False)}


_NANO: dict[str, Any] = {
    "embed_dim": (64, 128, 256, 512),
    "depths": (3, 4, 6, 3),
    "stem_width": (32, 64),
}
_PICO: dict[str, Any] = {**_NANO, "depths": (2, 3, 5, 2)}
_SIZE0: dict[str, Any] = {
    "embed_dim": (96, 192, 384, 768),
    "depths": (2, 3, 7, 2),
    "stem_width": (32, 64),
}
_SIZE1: dict[str, Any] = {**_SIZE0, "depths": (2, 6, 14, 2)}
_SIZE2: dict[str, Any] = {
    "embed_dim": (128, 256, 512, 1024),
    "depths": (2, 6, 14, 2),
    "stem_width": (64, 128),
}
_SIZE3: dict[str, Any] = {
    "embed_dim": (192, 384, 768, 1536),
    "depths": (2, 6, 14, 2),
    "stem_width": (96, 192),
}
_CROP_90 = Preprocessing(crop_pct=0.9)


def _paper(embed_dim: tuple, depths: tuple, stem: int) -> dict[str, Any]:
    return {
        "embed_dim": embed_dim,
        "depths": depths,
        "stem_width": (stem, stem),
        "head_hidden": embed_dim[-1],
        "conv": ConvBlockConfig(),
        "transformer": TransformerBlockConfig(),
    }


_TABLE: tuple[TimmSpec, ...] = (
    TimmSpec("coatnet_pico_rw_224", **_PICO, **_rw_max()),
    TimmSpec("coatnet_nano_rw_224", **_NANO, **_rw_max(stride_in_pool=True),
             preprocessing=_CROP_90),
    TimmSpec("coatnet_0_rw_224", **_SIZE0, **_rw_coat(se_early=True, shortcut_bias=False)),
    TimmSpec("coatnet_1_rw_224", **_SIZE1,
             **_rw_coat(stride_in_pool=False, se_early=True, shortcut_bias=False)),
    TimmSpec("coatnet_2_rw_224", **_SIZE2, **_rw_coat(stride_in_pool=False, se_act="silu")),
    TimmSpec("coatnet_3_rw_224", **_SIZE3,
             **_rw_coat(stride_in_pool=False, se_act="silu", layer_scale=1e-6)),
    TimmSpec("coatnet_bn_0_rw_224", **_SIZE0,
             **_rw_coat(stride_in_pool=False, se_early=True, shortcut_bias=False,
                        batch_norm=True), preprocessing=IMAGENET),
    TimmSpec("coatnet_rmlp_nano_rw_224", **_NANO, **_rw_max(rel_pos_mlp=384),
             preprocessing=_CROP_90),
    TimmSpec("coatnet_rmlp_0_rw_224", **_SIZE0,
             **_rw_coat(stride_in_pool=False, rel_pos_mlp=512)),
    TimmSpec("coatnet_rmlp_1_rw_224", **_SIZE1,
             **_rw_coat(pool="max", se_early=True, shortcut_bias=False, rel_pos_mlp=384)),
    TimmSpec("coatnet_rmlp_1_rw2_224", **_SIZE1,
             **_rw_coat(stride_in_pool=False, rel_pos_mlp=512)),
    TimmSpec("coatnet_rmlp_2_rw_224", **_SIZE2,
             **_rw_coat(stride_in_pool=False, se_act="silu", layer_scale=1e-6, rel_pos_mlp=512)),
    TimmSpec("coatnet_rmlp_2_rw_384", **_SIZE2,
             **_rw_coat(stride_in_pool=False, se_act="silu", layer_scale=1e-6, rel_pos_mlp=512),
             img_size=(384, 384), preprocessing=Preprocessing(crop_pct=1.0, crop_mode="squash")),
    TimmSpec("coatnet_rmlp_3_rw_224", **_SIZE3,
             **_rw_coat(stride_in_pool=False, se_act="silu", layer_scale=1e-6, rel_pos_mlp=512)),
    TimmSpec("coatnet_nano_cc_224", **_NANO, **_rw_coat(),
             block_types=(("C",), ("C",), ("C", "T"), ("C", "T"))),
    TimmSpec("coatnext_nano_rw_224", **_NANO, **_next(), preprocessing=_CROP_90),
    TimmSpec("coatnet_0_224", **_paper((96, 192, 384, 768), (2, 3, 5, 2), 64)),
    TimmSpec("coatnet_1_224", **_paper((96, 192, 384, 768), (2, 6, 14, 2), 64)),
    TimmSpec("coatnet_2_224", **_paper((128, 256, 512, 1024), (2, 6, 14, 2), 128)),
    TimmSpec("coatnet_3_224", **_paper((192, 384, 768, 1536), (2, 6, 14, 2), 192)),
    TimmSpec("coatnet_4_224", **_paper((192, 384, 768, 1536), (2, 12, 28, 2), 192)),
    TimmSpec("coatnet_5_224", **_paper((256, 512, 1280, 2048), (2, 12, 28, 2), 192)),
)  # fmt: skip

TIMM_VARIANTS: dict[str, TimmSpec] = {spec.name: spec for spec in _TABLE}
"""timm's CoAtNet-family architectures, by timm's model name."""


def scaled(spec: TimmSpec, name: str, **changes: Any) -> TimmSpec:
    """A copy of ``spec`` with other widths or depths (small configurations for tests)."""
    return replace(spec, name=name, **changes)
