"""timm's CoAtNet family (``maxxvit.py``) with timm's state-dict keys, without timm.

The arithmetic is timm's, written anew. Convolution blocks work on (B, C, H, W) maps; the
transformer blocks of a stage pass (B, N, C) tokens to each other, so the residual stream
changes layout once per stage, not in every LayerNorm. The relative position (a learned
table, or an MLP over log-spaced offsets) becomes a ((2H-1)(2W-1), heads) table either way,
gathered with timm's ``ij`` index; the index and the MLP's coordinates are regenerated, never
read from a checkpoint, as timm keeps them out of its state dicts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.coatnet import bake, baked_or, relative_index
from models.config import DIM_HEAD
from models.timm_config import (
    ConvBlockConfig,
    TimmSpec,
    TransformerBlockConfig,
    make_divisible,
)


def activation(name: str | None) -> nn.Module:
    """timm's activation layers by name (GELU is the exact erf form)."""
    layers = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh, None: nn.Identity}
    return layers[name]()


def to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) map -> (B*H*W, C) tokens: 2-D, so that every linear layer on them is one
    Gemm with its bias (onnxruntime fuses no bias into a MatMul on 3-D inputs)."""
    return x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1])


def to_map(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(B*H*W, C) tokens -> (B, C, H, W) map."""
    channels = x.shape[-1]
    return x.reshape(-1, size[0] * size[1], channels).transpose(1, 2).reshape(-1, channels, *size)


class NormAct(nn.BatchNorm2d):
    """BatchNorm then an activation; keys as timm's BatchNormAct2d."""

    def __init__(self, channels: int, act: str | None, eps: float = 1e-5) -> None:
        super().__init__(channels, eps=eps)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(super().forward(x))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a map, then an optional activation (LayerNormAct2d)."""

    def __init__(self, channels: int, act: str | None = None, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        normed = F.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        )
        return self.act(normed.permute(0, 3, 1, 2))


class TokenBatchNorm(nn.BatchNorm2d):
    """An eval-mode BatchNorm2d applied to (B*N, C) tokens (``coatnet_bn_0``)."""

    def forward(self, x: Tensor) -> Tensor:
        flat = F.batch_norm(
            x.reshape(-1, x.shape[-1]),
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            False,
            0.0,
            self.eps,
        )
        return flat.reshape(x.shape)


def token_norm(channels: int, cfg: TransformerBlockConfig) -> nn.Module:
    """The norm of a transformer block or the final norm, on tokens (eps 1e-6 as timm's)."""
    return TokenBatchNorm(channels, eps=1e-6) if cfg.batch_norm else nn.LayerNorm(channels, 1e-6)


class Pointwise(nn.Conv2d):
    """A 1x1 convolution (timm's 4-D weight) applied to (B*N, C) tokens as a linear layer."""

    def __init__(self, c_in: int, c_out: int, bias: bool = True) -> None:
        super().__init__(c_in, c_out, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.flatten(1), self.bias)


def pool(kind: str) -> nn.Module:
    """timm's 'avg2' (2x2 average, stride 2) or 'max' (3x3 max, stride 2, padding 1)."""
    return nn.MaxPool2d(3, 2, 1) if kind == "max" else nn.AvgPool2d(2)


class Downsample(nn.Module):
    """Pool by 2, then a 1x1 ``expand`` convolution when the width changes (Downsample2d)."""

    def __init__(self, c_in: int, c_out: int, kind: str, bias: bool = True) -> None:
        super().__init__()
        self.pool = pool(kind)
        self.expand = nn.Conv2d(c_in, c_out, 1, bias=bias) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.expand(self.pool(x))


class LayerScale(nn.Module):
    """A learned per-channel scale (timm's LayerScale2d; here on the last axis of tokens)."""

    def __init__(self, channels: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def layer_scale(channels: int, init: float | None) -> nn.Module:
    return LayerScale(channels, init) if init else nn.Identity()


class SqueezeExcite(nn.Module):
    """timm's SEModule: mean, 1x1 conv, activation, 1x1 conv, sigmoid gate."""

    def __init__(self, channels: int, squeezed: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.act = activation(act)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class MbConvBlock(nn.Module):
    """Pre-norm inverted bottleneck: 1x1, depthwise 3x3 with squeeze-excite, 1x1."""

    def __init__(self, c_in: int, c_out: int, stride: int, cfg: ConvBlockConfig) -> None:
        super().__init__()
        mid = make_divisible((c_out if cfg.expand_output else c_in) * 4)
        squeezed = int(cfg.se_ratio * (c_out if cfg.expand_output else mid))
        pooled = stride == 2 and cfg.stride_in_pool
        self.shortcut = (
            Downsample(c_in, c_out, cfg.pool, cfg.output_bias) if stride == 2 else nn.Identity()
        )
        self.pre_norm = NormAct(c_in, cfg.act if cfg.pre_norm_act else None)
        # timm's downsample_pool_type stays 'avg2' even where pool_type is 'max'
        self.down = Downsample(c_in, c_in, "avg2") if pooled else nn.Identity()
        self.conv1_1x1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.norm1 = NormAct(mid, cfg.act)
        depthwise_stride = 1 if pooled else stride
        self.conv2_kxk = nn.Conv2d(mid, mid, 3, depthwise_stride, 1, groups=mid, bias=False)
        se = SqueezeExcite(mid, squeezed, cfg.se_act)
        self.se_early = se if cfg.se_early else None
        self.norm2 = NormAct(mid, cfg.act)
        self.se = None if cfg.se_early else se
        self.conv3_1x1 = nn.Conv2d(mid, c_out, 1, bias=cfg.output_bias)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.shortcut(x)
        x = self.conv1_1x1(self.down(self.pre_norm(x)))
        x = self.conv2_kxk(self.norm1(x))
        if self.se_early is not None:
            x = self.se_early(x)
        x = self.norm2(x)
        if self.se is not None:
            x = self.se(x)
        return self.conv3_1x1(x) + shortcut


class ConvMlp(nn.Module):
    """fc1, activation, fc2 on tokens, with timm's 1x1-convolution weights (ConvMlp)."""

    def __init__(self, channels: int, hidden: int, act: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        self.fc1 = Pointwise(channels, hidden, bias)
        self.act = activation(act)
        self.fc2 = Pointwise(hidden, channels, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """coatnext's ConvNeXt block: depthwise 7x7, LayerNorm, MLP, layer scale, residual."""

    def __init__(self, c_in: int, c_out: int, stride: int, cfg: ConvBlockConfig) -> None:
        super().__init__()
        if stride == 2:
            self.shortcut: nn.Module = Downsample(c_in, c_out, "avg2")
        elif c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=cfg.output_bias)
        else:
            self.shortcut = nn.Identity()
        self.conv_dw = nn.Conv2d(c_in, c_out, 7, stride, 3, groups=c_in, bias=cfg.output_bias)
        self.norm = nn.LayerNorm(c_out, eps=1e-6)
        self.mlp = ConvMlp(c_out, 4 * c_out, cfg.act, cfg.output_bias)
        self.ls = layer_scale(c_out, cfg.layer_scale)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_dw(x)
        size = (y.shape[-2], y.shape[-1])
        y = self.ls(self.mlp(self.norm(to_tokens(y))))
        return to_map(y, size) + self.shortcut(x)


class RelPosBias(nn.Module):
    """A learned ((2H-1)(2W-1), heads) table of relative position biases (timm's RelPosBias)."""

    relative_position_index: Tensor

    def __init__(self, size: tuple[int, int], heads: int) -> None:
        super().__init__()
        self.size = size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * size[0] - 1) * (2 * size[1] - 1), heads)
        )
        self.reset_index()

    def reset_index(self) -> None:
        """(Re)compute the index (timm's ``ij`` convention); no checkpoint holds it."""
        index = relative_index(*self.size).reshape(-1)
        device = self.relative_position_bias_table.device
        self.register_buffer("relative_position_index", index.to(device), persistent=False)

    def table(self) -> Tensor:
        return self.relative_position_bias_table


class RelPosMlpNet(nn.Module):
    """fc1, ReLU, fc2: the MLP of timm's RelPosMlp (its dropout acts in training only)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, heads)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RelPosMlp(nn.Module):
    """Relative position biases from an MLP over sign(d) ln(1 + |d|) of each offset d (timm's
    RelPosMlp, mode 'cr')."""

    relative_position_index: Tensor

    def __init__(self, size: tuple[int, int], heads: int, hidden: int) -> None:
        super().__init__()
        self.size = size
        self.mlp = RelPosMlpNet(hidden, heads)
        self.reset_index()

    def reset_index(self) -> None:
        """(Re)compute the index and the log-spaced coordinates (non-persistent in timm)."""
        device = self.mlp.fc1.weight.device
        height, width = self.size
        rows = torch.arange(-(height - 1), height, dtype=torch.float32)
        cols = torch.arange(-(width - 1), width, dtype=torch.float32)
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
        coords = torch.sign(coords) * torch.log(1.0 + coords.abs())
        index = relative_index(height, width).reshape(-1)
        self.register_buffer("relative_position_index", index.to(device), persistent=False)
        self.register_buffer("rel_coords_log", coords.to(device), persistent=False)

    def table(self) -> Tensor:
        return self.mlp(self.rel_coords_log).reshape(-1, self.mlp.fc2.out_features)


class Attention(nn.Module):
    """Global multi-head attention over a stage's tokens with a relative position bias.

    The qkv output channels are timm's, per head (``h*96 + {q,k,v}*32 + d``), until
    :meth:`group_qkv` regroups them as all queries, all keys, all values (for export).
    """

    QKV = "qkv"
    """The query-key-value projection's attribute (the export splits it in three)."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        heads: int,
        size: tuple[int, int],
        rel_pos: RelPosBias | RelPosMlp,
    ) -> None:
        super().__init__()
        self.num_heads = heads
        self.num_tokens = size[0] * size[1]
        self.scale = DIM_HEAD**-0.5
        self.per_head = True
        self.onnx_attention = False
        """Compute attention as one ONNX ``Attention`` operator (export at opset 23)."""
        attn_dim = heads * DIM_HEAD
        self.qkv = Pointwise(dim, 3 * attn_dim)
        self.rel_pos = rel_pos
        self.proj = Pointwise(attn_dim, dim_out)
        self.register_buffer("baked_bias", None, persistent=False)
        self.register_buffer("baked_table", None, persistent=False)

    def reset_index(self) -> None:
        self.rel_pos.reset_index()

    def relative_bias(self) -> Tensor:
        """The (heads, N, N) bias added to the attention scores."""
        index = self.rel_pos.relative_position_index
        n = self.num_tokens
        return self.rel_pos.table()[index].reshape(n, n, self.num_heads).permute(2, 0, 1)

    def relative_bias_index(self) -> Tensor:
        """The (N*N,) row of the table that each (query, key) pair reads."""
        return self.rel_pos.relative_position_index

    def bake_bias(self, index: Tensor | None = None) -> Tensor:
        """Freeze the bias (an MLP runs once, here) into constants and return them: the
        (1, heads, N, N) bias, or given a shared (N*N,) ``index`` the (1, heads, T) table that
        it gathers in the graph."""
        table = self.rel_pos.table().detach()
        return bake(self, table, index, self.relative_bias().detach())

    def bias(self) -> Tensor:
        """(1, heads, N, N): baked, gathered from a baked table, or computed."""
        return baked_or(self, lambda: self.relative_bias()[None])

    @torch.no_grad()
    @torch.no_grad()
    def group_qkv(self) -> None:
        """Reorder the qkv channels from per head (h, {q,k,v}, d) to ({q,k,v}, h, d), in place."""
        if not self.per_head:
            return
        order = torch.arange(self.qkv.out_channels).reshape(self.num_heads, 3, DIM_HEAD)
        order = order.permute(1, 0, 2).reshape(-1)
        bias = self.qkv.bias
        assert bias is not None  # the qkv projection is biased
        self.qkv.weight.copy_(self.qkv.weight[order])
        bias.copy_(bias[order])
        self.per_head = False

    @torch.no_grad()
    def fold_scale(self) -> None:
        """Scale the query projection instead of the scores (after :meth:`group_qkv`)."""
        self.group_qkv()
        rows = self.num_heads * DIM_HEAD
        bias = self.qkv.bias
        assert bias is not None  # the qkv projection is biased
        self.qkv.weight[:rows] *= self.scale
        bias[:rows] *= self.scale
        self.scale = 1.0

    def split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        heads, n = self.num_heads, self.num_tokens
        if self.per_head:
            parts = qkv.reshape(-1, n, heads, 3, DIM_HEAD).permute(3, 0, 2, 1, 4)
        else:
            parts = qkv.reshape(-1, n, 3, heads, DIM_HEAD).permute(2, 0, 3, 1, 4)
        q, k, v = parts.unbind(0)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        if self.onnx_attention:
            return self.forward_onnx_attention(x)
        q, k, v = self.split_heads(self.qkv(x))
        scores = q @ k.transpose(-2, -1)
        if self.scale != 1.0:
            scores = scores * self.scale
        out = (scores + self.bias()).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(-1, q.shape[1] * DIM_HEAD))

    def forward_onnx_attention(self, x: Tensor) -> Tensor:
        """The same attention as one ONNX ``Attention`` node on (B, N, heads x 32) inputs
        (needs :meth:`group_qkv`; the export splits the projection into three)."""
        qkv = self.qkv(x)
        parts = qkv if isinstance(qkv, tuple) else qkv.chunk(3, dim=-1)
        q, k, v = (p.reshape(-1, self.num_tokens, p.shape[-1]) for p in parts)
        out, *_ = torch.onnx.ops.attention(
            q,
            k,
            v,
            self.bias(),
            q_num_heads=self.num_heads,
            kv_num_heads=self.num_heads,
            scale=self.scale,
        )
        return self.proj(out.reshape(-1, out.shape[-1]))


class NormThenPool(nn.Module):
    """The ``norm1`` of a downsampling transformer block: the norm, then the pool (on a map)."""

    def __init__(self, norm: nn.Module, kind: str) -> None:
        super().__init__()
        self.norm = norm
        self.down = Downsample(0, 0, kind)

    def forward(self, tokens: Tensor, size: tuple[int, int]) -> Tensor:
        """(B*H*W, C) tokens of an (H, W) map -> tokens of the normalised, pooled map."""
        return to_tokens(self.down(to_map(self.norm(tokens), size)))


class TransformerBlock(nn.Module):
    """timm's TransformerBlock2d on tokens: attention and MLP, each pre-norm with a residual."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        stride: int,
        heads: int,
        size: tuple[int, int],
        cfg: TransformerBlockConfig,
    ) -> None:
        super().__init__()
        if stride == 2:
            self.shortcut: nn.Module = Downsample(dim, dim_out, cfg.pool, cfg.shortcut_bias)
            self.norm1: nn.Module = NormThenPool(token_norm(dim, cfg), cfg.pool)
        else:
            self.shortcut = nn.Identity()
            self.norm1 = token_norm(dim, cfg)
        rel_pos = (
            RelPosMlp(size, heads, cfg.rel_pos_mlp) if cfg.rel_pos_mlp else RelPosBias(size, heads)
        )
        self.attn = Attention(dim, dim_out, heads, size, rel_pos)
        self.ls1 = layer_scale(dim_out, cfg.layer_scale)
        self.norm2 = token_norm(dim_out, cfg)
        self.mlp = ConvMlp(dim_out, 4 * dim_out)
        self.ls2 = layer_scale(dim_out, cfg.layer_scale)
        self.stride = stride

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """A map or tokens of an input map of ``size`` in, tokens out."""
        tokens = to_tokens(x) if x.ndim == 4 else x
        if self.stride == 2:
            shortcut = to_tokens(self.shortcut(x if x.ndim == 4 else to_map(x, size)))
            normed = self.norm1(tokens, size)
        else:
            shortcut, normed = tokens, self.norm1(tokens)
        x = shortcut + self.ls1(self.attn(normed))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Stem(nn.Module):
    """3x3 stride-2 conv, norm and activation, 3x3 conv (no norm after it)."""

    def __init__(self, in_channels: int, spec: TimmSpec) -> None:
        super().__init__()
        first, second = spec.stem_width
        self.conv1 = nn.Conv2d(in_channels, first, 3, 2, 1, bias=False)
        norm = LayerNorm2d if spec.conv.convnext else NormAct
        self.norm1 = norm(first, spec.stem_act)
        self.conv2 = nn.Conv2d(first, second, 3, 1, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class Stage(nn.Module):
    """The blocks of one stage (``stages.i.blocks.j`` in the keys)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)


class ClassifierHead(nn.Module):
    """``head.fc``, or the paper-like pre-logits head: norm, fc + tanh, fc."""

    def __init__(self, channels: int, num_classes: int, hidden: int | None) -> None:
        super().__init__()
        if hidden:
            self.norm = nn.LayerNorm(channels, eps=1e-6)
            self.pre_logits = nn.Sequential()
            self.pre_logits.add_module("fc", nn.Linear(channels, hidden))
            self.pre_logits.add_module("act", nn.Tanh())
            channels = hidden
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        if hasattr(self, "pre_logits"):
            pooled = self.pre_logits(self.norm(pooled))
        return self.fc(pooled)


class TimmCoAtNet(nn.Module):
    """A timm CoAtNet-family network (timm's ``MaxxVit`` for CoAtNet configurations).

    Args:
        spec: the architecture (a row of ``TIMM_VARIANTS``).
        img_size: (height, width), multiples of 32; fixes the relative positions.
        num_classes: outputs of the head.
        in_channels: input channels.
    """

    def __init__(
        self, spec: TimmSpec, img_size: tuple[int, int], num_classes: int, in_channels: int
    ) -> None:
        super().__init__()
        self.spec = spec
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.stem = Stem(in_channels, spec)
        self.stages = nn.Sequential(*self._stages())
        last = spec.embed_dim[-1]
        self.norm = nn.Identity() if spec.head_hidden else token_norm(last, spec.transformer)
        self.head = ClassifierHead(last, num_classes, spec.head_hidden)

    def _stages(self) -> Iterator[Stage]:
        spec = self.spec
        dim = spec.stem_width[1]
        for stage, dim_out in enumerate(spec.embed_dim):
            size = self.stage_size(stage + 1)
            blocks: list[nn.Module] = []
            for j, kind in enumerate(spec.stage_blocks(stage)):
                stride = 2 if j == 0 else 1
                if kind == "T":
                    heads = spec.attention_heads(dim, dim_out)
                    blocks.append(
                        TransformerBlock(dim, dim_out, stride, heads, size, spec.transformer)
                    )
                elif spec.conv.convnext:
                    blocks.append(ConvNeXtBlock(dim, dim_out, stride, spec.conv))
                else:
                    blocks.append(MbConvBlock(dim, dim_out, stride, spec.conv))
                blocks[-1].out_size = size  # type: ignore[assignment]  # read back below
                dim = dim_out
            yield Stage(blocks)

    def stage_size(self, stage: int) -> tuple[int, int]:
        """The map size after the stem (0) or stage 1..4."""
        factor = 2 ** (stage + 1)
        return self.img_size[0] // factor, self.img_size[1] // factor

    def blocks(self) -> list[nn.Module]:
        return [block for stage in self.stages for block in cast(Stage, stage).blocks]

    def attention_blocks(self) -> list[Attention]:
        """Every attention module, in forward order."""
        return [m for m in self.modules() if isinstance(m, Attention)]

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> (B*N, C) tokens of the last stage, before the final norm."""
        x = self.stem(x)
        size = self.stage_size(0)
        for block in self.blocks():
            if isinstance(block, TransformerBlock):
                x = block(x, size)
            else:
                x = block(to_map(x, size) if x.ndim == 2 else x)
            size = cast("tuple[int, int]", block.out_size)
        return to_tokens(x) if x.ndim == 4 else x

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.norm(self.forward_features(x))
        size = self.stage_size(4)
        return self.head(tokens.reshape(-1, size[0] * size[1], tokens.shape[-1]).mean(dim=1))
