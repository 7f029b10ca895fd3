"""Parameters and multiply-accumulates of a CoAtNet, from its configuration alone.

Plain arithmetic over the layers (no torch, no model), so `coatnet-export variants` answers at
once. The multiply-accumulates are what torch's flop counter counts, halved: convolutions,
linear layers and attention's two matrix products (q.k^T and weights.v); norms, activations,
pooling and additions are not counted. tests/test_model.py checks both numbers against the
built model and the flop counter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from models.config import DIM_HEAD, STAGE_STRIDES, check_config
from models.timm_config import TimmSpec, make_divisible
from models.variants import VariantSpec


@dataclass(frozen=True)
class Cost:
    """Parameters, and multiply-accumulates for one image."""

    parameters: int = 0
    macs: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.parameters + other.parameters, self.macs + other.macs)

    def __mul__(self, times: int) -> Cost:
        return Cost(self.parameters * times, self.macs * times)


def conv(c_in: int, c_out: int, kernel: int, pixels: int, groups: int = 1, bias: bool = False):
    """A convolution producing ``pixels`` output positions."""
    weights = c_out * (c_in // groups) * kernel * kernel
    return Cost(weights + (c_out if bias else 0), weights * pixels)


def linear(c_in: int, c_out: int, rows: int, bias: bool = True) -> Cost:
    """A linear layer applied to ``rows`` vectors."""
    return Cost(c_in * c_out + (c_out if bias else 0), c_in * c_out * rows)


def norm(channels: int) -> Cost:
    """BatchNorm or LayerNorm: a scale and a shift per channel, no counted products."""
    return Cost(2 * channels, 0)


def stem(in_channels: int, channels: int, depth: int, pixels: int) -> Cost:
    """S0: 3x3 convolutions (the first with stride 2), each with a BatchNorm."""
    first = conv(in_channels, channels, 3, pixels) + norm(channels)
    return first + (conv(channels, channels, 3, pixels) + norm(channels)) * (depth - 1)


def mbconv(c_in: int, c_out: int, pixels: int, downsample: bool) -> Cost:
    """An MBConv block whose output has ``pixels`` positions (the stride is in its first 1x1)."""
    hidden = 4 * c_in
    squeezed = int(0.25 * c_in)
    cost = (
        norm(c_in)  # the pre-norm
        + conv(c_in, hidden, 1, pixels)
        + norm(hidden)
        + conv(hidden, hidden, 3, pixels, groups=hidden)
        + norm(hidden)
        + linear(hidden, squeezed, 1, bias=False)  # squeeze-excitation, on the pooled vector
        + linear(squeezed, hidden, 1, bias=False)
        + conv(hidden, c_out, 1, pixels)
        + norm(c_out)
    )
    return cost + conv(c_in, c_out, 1, pixels) if downsample else cost


def transformer(c_in: int, c_out: int, size: tuple[int, int], heads: int, project: bool) -> Cost:
    """A Transformer block on a ``size`` map (after its pool, if it has one)."""
    height, width = size
    tokens = height * width
    inner = DIM_HEAD * heads
    table = Cost((2 * height - 1) * (2 * width - 1) * heads, 0)
    products = Cost(0, 2 * heads * tokens * tokens * DIM_HEAD)  # q.k^T and weights.v
    attention = (
        norm(c_in)
        + linear(c_in, 3 * inner, tokens, bias=False)
        + table
        + products
        + linear(inner, c_out, tokens)
    )
    feed_forward = norm(c_out) + linear(c_out, 4 * c_in, tokens) + linear(4 * c_in, c_out, tokens)
    shortcut = linear(c_in, c_out, tokens, bias=False) if project else Cost()
    return attention + feed_forward + shortcut


def stage(
    block_type: str,
    c_in: int,
    c_out: int,
    depth: int,
    size: tuple[int, int],
    heads: int,
    downsample: bool = True,
) -> Cost:
    """``depth`` blocks at ``size``; the first changes the width (and halves the resolution
    when ``downsample``)."""
    total = Cost()
    for j in range(depth):
        block_in = c_in if j == 0 else c_out
        if block_type == "C":
            total += mbconv(block_in, c_out, size[0] * size[1], downsample and j == 0)
        else:
            total += transformer(block_in, c_out, size, heads, project=j == 0)
    return total


def timm_mbconv(spec: TimmSpec, c_in: int, c_out: int, stride: int, pixels: int) -> Cost:
    """timm's MbConvBlock with ``pixels`` output positions."""
    cfg = spec.conv
    mid = make_divisible(4 * (c_out if cfg.expand_output else c_in))
    squeezed = int(cfg.se_ratio * (c_out if cfg.expand_output else mid))
    strided_1x1 = stride == 2 and not cfg.stride_in_pool  # conv1_1x1 runs before the stride
    cost = (
        norm(c_in)
        + conv(c_in, mid, 1, pixels * (4 if strided_1x1 else 1))
        + norm(mid)
        + conv(mid, mid, 3, pixels, groups=mid)
        + conv(mid, squeezed, 1, 1, bias=True)
        + conv(squeezed, mid, 1, 1, bias=True)
        + norm(mid)
        + conv(mid, c_out, 1, pixels, bias=cfg.output_bias)
    )
    if stride == 2 and c_in != c_out:
        cost += conv(c_in, c_out, 1, pixels, bias=cfg.output_bias)
    return cost


def timm_convnext(spec: TimmSpec, c_in: int, c_out: int, stride: int, pixels: int) -> Cost:
    """timm's ConvNeXtBlock (coatnext) with ``pixels`` output positions."""
    bias = spec.conv.output_bias
    cost = (
        conv(c_in, c_out, 7, pixels, groups=c_in, bias=bias)
        + norm(c_out)
        + linear(c_out, 4 * c_out, pixels, bias)
        + linear(4 * c_out, c_out, pixels, bias)
        + Cost(c_out if spec.conv.layer_scale else 0, 0)
    )
    if c_in != c_out:
        cost += conv(c_in, c_out, 1, pixels, bias=bias if stride == 1 else True)
    return cost


def timm_transformer(
    spec: TimmSpec, c_in: int, c_out: int, stride: int, size: tuple[int, int]
) -> Cost:
    """timm's TransformerBlock2d on a ``size`` map (after its pool)."""
    cfg = spec.transformer
    heads = spec.attention_heads(c_in, c_out)
    tokens, inner = size[0] * size[1], spec.attention_heads(c_in, c_out) * DIM_HEAD
    offsets = (2 * size[0] - 1) * (2 * size[1] - 1)
    if cfg.rel_pos_mlp:
        rel_pos = linear(2, cfg.rel_pos_mlp, offsets) + linear(cfg.rel_pos_mlp, heads, offsets)
    else:
        rel_pos = Cost(offsets * heads, 0)
    scales = Cost(2 * c_out if cfg.layer_scale else 0, 0)
    cost = (
        norm(c_in)
        + linear(c_in, 3 * inner, tokens)
        + rel_pos
        + Cost(0, 2 * heads * tokens * tokens * DIM_HEAD)
        + linear(inner, c_out, tokens)
        + norm(c_out)
        + linear(c_out, 4 * c_out, tokens)
        + linear(4 * c_out, c_out, tokens)
        + scales
    )
    if stride == 2 and c_in != c_out:
        cost += conv(c_in, c_out, 1, tokens, bias=cfg.shortcut_bias)
    return cost


def timm_cost(spec: TimmSpec, img_size: Sequence[int], num_classes: int, in_channels: int) -> Cost:
    """Parameters and multiply-accumulates of a timm CoAtNet (no torch)."""
    spec.check_size(img_size)
    first, second = spec.stem_width
    pixels = (img_size[0] // 2) * (img_size[1] // 2)
    total = conv(in_channels, first, 3, pixels) + norm(first) + conv(first, second, 3, pixels)
    c_in = second
    for stage, c_out in enumerate(spec.embed_dim):
        size = (img_size[0] // 2 ** (stage + 2), img_size[1] // 2 ** (stage + 2))
        for j, kind in enumerate(spec.stage_blocks(stage)):
            stride = 2 if j == 0 else 1
            if kind == "T":
                total += timm_transformer(spec, c_in, c_out, stride, size)
            elif spec.conv.convnext:
                total += timm_convnext(spec, c_in, c_out, stride, size[0] * size[1])
            else:
                total += timm_mbconv(spec, c_in, c_out, stride, size[0] * size[1])
            c_in = c_out
    total += norm(c_in)
    if spec.head_hidden:
        return total + linear(c_in, spec.head_hidden, 1) + linear(spec.head_hidden, num_classes, 1)
    return total + linear(c_in, num_classes, 1)


def variant_cost(
    spec: VariantSpec | TimmSpec,
    img_size: Sequence[int] = (224, 224),
    num_classes: int = 1000,
    in_channels: int = 3,
) -> Cost:
    """Parameters and multiply-accumulates per image of ``spec`` at ``img_size``.

    Raises :class:`models.ConfigError` for a size the network cannot take.
    """
    if isinstance(spec, TimmSpec):
        return timm_cost(spec, img_size, num_classes, in_channels)
    check_config(
        img_size,
        in_channels,
        spec.num_blocks,
        spec.channels,
        num_classes,
        spec.num_heads,
        spec.block_types,
    )
    sizes = [(img_size[0] // s, img_size[1] // s) for s in STAGE_STRIDES]
    widths = list(spec.channels)
    if spec.tandem is not None:
        widths[3] = spec.tandem.channels[1]
    total = stem(in_channels, widths[0], spec.num_blocks[0], sizes[0][0] * sizes[0][1])
    for s in range(1, 5):
        if s == 3 and spec.tandem is not None:
            (convs, tokens), (mid, out) = spec.tandem.num_blocks, spec.tandem.channels
            total += stage("C", widths[2], mid, convs, sizes[3], spec.num_heads)
            total += stage("T", mid, out, tokens, sizes[3], spec.num_heads, downsample=False)
            continue
        block_type = spec.block_types[s - 1]
        total += stage(
            block_type, widths[s - 1], widths[s], spec.num_blocks[s], sizes[s], spec.num_heads
        )
    return total + linear(widths[4], num_classes, 1, bias=False)
