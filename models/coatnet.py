"""The CoAtNet reference model (Dai et al. 2021) with lucid's module names and widths.

The state_dict keys equal those of lucid's ``CoAtNet`` (and of chinhsuanwu/coatnet-pytorch),
so their checkpoints load without renaming. The mathematics is the seed document's: scores
divided by sqrt(d_head), a row-major relative index, exact GELU, max-pool padded with -inf and
a head that averages the whole final map. lucid's own numerics are available through
:class:`Numerics` for exact parity with lucid-trained networks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import (
    DIM_HEAD,
    STAGE_STRIDES,
    ConfigError,
    Numerics,
    Tandem,
    check_config,
)


def _gelu(numerics: Numerics) -> nn.GELU:
    return nn.GELU(approximate="tanh" if numerics.gelu_tanh else "none")


class MaxPoolDown(nn.Module):
    """3x3 max-pool with stride 2 and padding 1 (padding value -inf, or 0 in lucid mode)."""

    def __init__(self, zero_pad: bool) -> None:
        super().__init__()
        self.zero_pad = zero_pad

    def forward(self, x: Tensor) -> Tensor:
        if self.zero_pad:
            return F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2)
        return F.max_pool2d(x, 3, 2, 1)


class PreNorm(nn.Module):
    """``fn(norm(x))``; the names ``norm`` and ``fn`` are part of the checkpoint keys."""

    def __init__(self, norm: nn.Module, fn: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation on the hidden width, squeezed to int(0.25 x block input)."""

    def __init__(self, block_in: int, hidden: int, numerics: Numerics) -> None:
        super().__init__()
        squeezed = int(0.25 * block_in)
        self.fc = nn.Sequential(
            nn.Linear(hidden, squeezed, bias=False),
            _gelu(numerics),
            nn.Linear(squeezed, hidden, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        weights = self.fc(x.mean(dim=(2, 3)))
        return x * weights[:, :, None, None]


class MBConv(nn.Module):
    """Pre-norm inverted bottleneck with squeeze-excitation (block type ``C``)."""

    def __init__(
        self, in_channels: int, out_channels: int, downsample: bool, numerics: Numerics
    ) -> None:
        super().__init__()
        hidden = 4 * in_channels
        self.downsample = downsample
        if downsample:
            self.pool = MaxPoolDown(numerics.maxpool_zero_pad)
            self.proj = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        elif in_channels != out_channels:
            raise ConfigError("an MBConv block that keeps the resolution must keep the width")
        body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, stride=2 if downsample else 1, bias=False),
            nn.BatchNorm2d(hidden),
            _gelu(numerics),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            _gelu(numerics),
            SqueezeExcite(in_channels, hidden, numerics),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.conv = PreNorm(nn.BatchNorm2d(in_channels), body)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.proj(self.pool(x)) if self.downsample else x
        return shortcut + self.conv(x)


def relative_index(height: int, width: int) -> Tensor:
    """Row-major relative position index of shape (N, N), N = height x width.

    Token t sits at (t // width, t % width). Entry (i, j) is the row of the relative bias table
    that holds the offset (row_i - row_j, col_i - col_j), over a (2H-1) x (2W-1) grid.
    """
    rows, cols = torch.meshgrid(
        torch.arange(height, device="cpu"), torch.arange(width, device="cpu"), indexing="ij"
    )
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + height - 1
    d_col = cols[:, None] - cols[None, :] + width - 1
    return d_row * (2 * width - 1) + d_col


def bake(module: nn.Module, table: Tensor, index: Tensor | None, bias: Tensor) -> Tensor:
    """Register an attention block's constant bias: the (1, heads, N, N) ``bias``, or with a
    shared ``index`` the (1, heads, T) transposed ``table`` (T, heads) it gathers from."""
    if index is None:
        baked = bias[None].clone().contiguous()
        module.register_buffer("baked_bias", baked, persistent=False)
        return baked
    compact = table.t()[None].contiguous()
    module.register_buffer("baked_table", compact, persistent=False)
    module.register_buffer("baked_index", index, persistent=False)
    return compact


def baked_or(module: Any, compute: Callable[[], Tensor]) -> Tensor:
    """The (1, heads, N, N) bias of a block: baked, gathered (one Gather on axis 2) from its
    baked table with the shared index, or ``compute()`` before baking."""
    if module.baked_bias is not None:
        return module.baked_bias
    if module.baked_table is not None:
        n = module.num_tokens
        gathered = module.baked_table.index_select(2, module.baked_index)
        return gathered.reshape(1, module.num_heads, n, n)
    return compute()


class RelativeAttention(nn.Module):
    """Global multi-head self-attention with a learned relative position bias."""

    QKV = "to_qkv"
    """The query-key-value projection's attribute (the export splits it in three)."""
    relative_index: Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        map_size: tuple[int, int],
        num_heads: int,
        numerics: Numerics,
    ) -> None:
        super().__init__()
        height, width = map_size
        inner = DIM_HEAD * num_heads
        self.map_size = (height, width)
        self.num_tokens = height * width
        self.num_heads = num_heads
        self.scale = math.sqrt(DIM_HEAD) if numerics.scale_multiply else DIM_HEAD**-0.5
        self.relative_bias_table = nn.Parameter(
            torch.zeros((2 * height - 1) * (2 * width - 1), num_heads)
        )
        self.reset_index()
        self.register_buffer("baked_bias", None, persistent=False)
        self.register_buffer("baked_table", None, persistent=False)
        self.onnx_attention = False
        """Compute attention as one ONNX ``Attention`` operator (set for export at opset 23 by
        ``coatnet_export``); eager training and inference keep the matrix products."""
        self.to_qkv = nn.Linear(in_channels, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, out_channels), nn.Dropout(0.0))

    def reset_index(self) -> None:
        """(Re)compute the derived relative index; it is never saved in checkpoints."""
        index = relative_index(*self.map_size).to(self.relative_bias_table.device)
        self.register_buffer("relative_index", index, persistent=False)

    def relative_bias(self) -> Tensor:
        """The (heads, N, N) bias added to the attention scores, gathered from the table."""
        n = self.relative_index.shape[0]
        gathered = self.relative_bias_table[self.relative_index.reshape(-1)]
        return gathered.reshape(n, n, self.num_heads).permute(2, 0, 1)

    def relative_bias_index(self) -> Tensor:
        """The (N, N) row of the table that each (query, key) pair reads."""
        return self.relative_index

    def bake_bias(self, index: Tensor | None = None) -> Tensor:
        """Freeze the bias for this resolution into constants (for export) and return them:
        the (1, heads, N, N) bias (the leading 1 spares the graph an Unsqueeze), or, given a
        shared (N*N,) ``index``, the (1, heads, T) table it gathers in the graph."""
        table = self.relative_bias_table.detach()
        return bake(self, table, index, self.relative_bias().detach())

    def bias(self) -> Tensor:
        """(1, heads, N, N): baked, gathered from a baked table, or looked up."""
        return baked_or(self, lambda: self.relative_bias()[None])

    @torch.no_grad()
    def fold_scale(self) -> None:
        """Scale the query projection instead of the scores: (s q) k^T = s (q k^T), one op less."""
        inner = self.num_heads * DIM_HEAD
        self.to_qkv.weight[:inner] *= self.scale
        self.scale = 1.0

    def forward(self, x: Tensor) -> Tensor:
        if self.onnx_attention:
            return self.forward_onnx_attention(x)
        # shapes are Python constants except the batch (-1): the graph needs no shape arithmetic
        tokens, heads = self.num_tokens, self.num_heads
        qkv = self.to_qkv(x).reshape(-1, tokens, 3, heads, DIM_HEAD).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.bias()
        scores = q @ k.transpose(-2, -1)
        if self.scale != 1.0:
            scores = scores * self.scale
        scores = scores + bias
        out = scores.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(-1, tokens, heads * DIM_HEAD))

    def forward_onnx_attention(self, x: Tensor) -> Tensor:
        """The same attention as one ONNX ``Attention`` node (opset 23) on (B, N, heads x 32)
        queries, keys and values: the head split and merge happen inside the operator, so the
        graph has no reshapes or transposes around it."""
        qkv = self.to_qkv(x)  # a projection split for export returns the three parts
        q, k, v = qkv if isinstance(qkv, tuple) else qkv.chunk(3, dim=-1)
        bias = self.bias()
        out, *_ = torch.onnx.ops.attention(
            q,
            k,
            v,
            bias,
            q_num_heads=self.num_heads,
            kv_num_heads=self.num_heads,
            scale=self.scale,
        )
        return self.to_out(out)


class ToTokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C) for a fixed channel count and map size."""

    def __init__(self, channels: int, map_size: tuple[int, int]) -> None:
        super().__init__()
        self.shape = (-1, channels, map_size[0] * map_size[1])

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(self.shape).transpose(1, 2)


class ToMap(nn.Module):
    """(B, H*W, C) -> (B, C, H, W) for a fixed channel count and map size."""

    def __init__(self, channels: int, map_size: tuple[int, int]) -> None:
        super().__init__()
        self.shape = (-1, channels, *map_size)

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(self.shape)


class FeedForward(nn.Module):
    """Linear(out -> 4 x block input) -> GELU -> Linear(-> out)."""

    def __init__(self, dim: int, hidden: int, numerics: Numerics) -> None:
        super().__init__()
        self.ff = nn.Sequential(
            nn.Linear(dim, hidden),
            _gelu(numerics),
            nn.Dropout(0.0),
            nn.Linear(hidden, dim),
            nn.Dropout(0.0),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.ff(x)


class Transformer(nn.Module):
    """Pre-norm relative-attention block (block type ``T``) on a fixed map size.

    ``downsample`` halves the resolution (max-pool on both paths, 1x1 projection on the
    shortcut). ``project`` without ``downsample`` changes the width at the same resolution, as
    the first Transformer block of the coatnet_6/7 tandem stage does. The residual stream is
    kept as tokens (B, H*W, C) inside the block, and across a :class:`TransformerStage`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        map_size: tuple[int, int],
        num_heads: int,
        downsample: bool,
        numerics: Numerics,
        project: bool = False,
    ) -> None:
        super().__init__()
        self.downsample = downsample
        if downsample:
            self.pool = MaxPoolDown(numerics.maxpool_zero_pad)
        self.proj = (
            nn.Conv2d(in_channels, out_channels, 1, bias=False) if downsample or project else None
        )
        if self.proj is None and in_channels != out_channels:
            raise ConfigError("a Transformer block without projection must keep the width")
        attention = RelativeAttention(in_channels, out_channels, map_size, num_heads, numerics)
        feed_forward = FeedForward(out_channels, 4 * in_channels, numerics)
        # key "1": lucid's checkpoint keys (attn.1.*, ff.1.*); its layout changes at 0 and 2
        # hold no weights
        self.attn = nn.ModuleDict({"1": PreNorm(nn.LayerNorm(in_channels), attention)})
        self.ff = nn.ModuleDict({"1": PreNorm(nn.LayerNorm(out_channels), feed_forward)})
        self.to_tokens = ToTokens(in_channels, map_size)
        self.to_map = ToMap(out_channels, map_size)

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        """(B, N, C_in) tokens of the (pooled) map -> (B, N, C_out)."""
        shortcut = tokens
        if self.proj is not None:  # the 1x1 convolution, applied to tokens
            shortcut = F.linear(tokens, self.proj.weight.flatten(1), self.proj.bias)
        tokens = shortcut + self.attn["1"](tokens)
        return tokens + self.ff["1"](tokens)

    def forward(self, x: Tensor) -> Tensor:
        return run_on_tokens([self], x)


def run_on_tokens(blocks: Sequence[Transformer], x: Tensor) -> Tensor:
    """Run consecutive Transformer blocks on a map, passing tokens between them."""
    first = blocks[0]
    if first.downsample:
        x = first.pool(x)
    tokens = first.to_tokens(x)
    for block in blocks:
        tokens = block.forward_tokens(tokens)
    return blocks[-1].to_map(tokens)


class TransformerStage(nn.Sequential):
    """Transformer blocks passing tokens to each other: one layout change in, one out."""

    def forward(self, x: Tensor) -> Tensor:
        return run_on_tokens(cast("list[Transformer]", list(self)), x)


def _stem_block(
    in_channels: int, out_channels: int, stride: int, numerics: Numerics
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        _gelu(numerics),
    )


class CoAtNet(nn.Module):
    """CoAtNet with stages S0 (conv stem) .. S4 and a linear head without bias.

    Args:
        img_size: (height, width), each a multiple of 32; fixes every relative bias table.
        in_channels: input channels, usually 3.
        num_blocks: blocks per stage S0..S4.
        channels: output width of each stage S0..S4.
        num_classes: outputs of the head.
        num_heads: attention heads; the attention width is 32 x num_heads in every block.
        block_types: ``"C"`` (MBConv) or ``"T"`` (Transformer) for S1..S4.
        tandem: replaces S3 by an MBConv run then a Transformer run at 1/16 (coatnet_6/7).
        numerics: numerical conventions; the default is the seed's mathematics.
    """

    def __init__(
        self,
        img_size: Sequence[int],
        in_channels: int,
        num_blocks: Sequence[int],
        channels: Sequence[int],
        num_classes: int = 1000,
        num_heads: int = 32,
        block_types: Sequence[str] = ("C", "C", "T", "T"),
        tandem: Tandem | None = None,
        numerics: Numerics = Numerics(),
    ) -> None:
        super().__init__()
        check_config(
            img_size, in_channels, num_blocks, channels, num_classes, num_heads, block_types
        )
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.numerics = numerics
        self.s0 = nn.Sequential(
            *(
                _stem_block(
                    in_channels if j == 0 else channels[0],
                    channels[0],
                    2 if j == 0 else 1,
                    numerics,
                )
                for j in range(num_blocks[0])
            )
        )
        widths = list(channels)
        if tandem is not None:
            widths[3] = tandem.channels[1]
        for stage in range(1, 5):
            if stage == 3 and tandem is not None:
                self.s3_tandem = nn.Sequential(
                    self._stage(
                        3, "C", widths[2], tandem.channels[0], tandem.num_blocks[0], num_heads
                    ),
                    self._stage(
                        3,
                        "T",
                        tandem.channels[0],
                        tandem.channels[1],
                        tandem.num_blocks[1],
                        num_heads,
                        downsample=False,
                    ),
                )
                continue
            setattr(
                self,
                f"s{stage}",
                self._stage(
                    stage,
                    block_types[stage - 1],
                    widths[stage - 1],
                    widths[stage],
                    num_blocks[stage],
                    num_heads,
                ),
            )
        self.fc = nn.Linear(widths[4], num_classes, bias=False)

    def _stage(
        self,
        stage: int,
        block_type: str,
        in_channels: int,
        out_channels: int,
        depth: int,
        num_heads: int,
        downsample: bool = True,
    ) -> nn.Sequential:
        map_size = self.stage_size(stage)
        blocks: list[nn.Module] = []
        for j in range(depth):
            block_in = in_channels if j == 0 else out_channels
            first = j == 0 and downsample
            if block_type == "C":
                blocks.append(MBConv(block_in, out_channels, first, self.numerics))
            else:
                blocks.append(
                    Transformer(
                        block_in,
                        out_channels,
                        map_size,
                        num_heads,
                        first,
                        self.numerics,
                        project=j == 0,
                    )
                )
        return nn.Sequential(*blocks) if block_type == "C" else TransformerStage(*blocks)

    def stage_size(self, stage: int) -> tuple[int, int]:
        """Spatial size (height, width) of the feature map that stage S0..S4 outputs."""
        factor = STAGE_STRIDES[stage]
        return self.img_size[0] // factor, self.img_size[1] // factor

    def stages(self) -> list[nn.Module]:
        """The five stages in order (S3 is the tandem stage where there is one)."""
        s3 = "s3_tandem" if hasattr(self, "s3_tandem") else "s3"
        return [self.get_submodule(name) for name in ("s0", "s1", "s2", s3, "s4")]

    def attention_blocks(self) -> list[RelativeAttention]:
        """Every relative-attention module, in forward order."""
        return [m for m in self.modules() if isinstance(m, RelativeAttention)]

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages():
            x = stage(x)
        return self.fc(x.mean(dim=(2, 3)))
