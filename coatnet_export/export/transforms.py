"""Exact rewrites of the PyTorch model before export: constant biases, folded BatchNorm,
layer scales and attention scales, token linear layers with (in, out) weights, and the fused
attention operator. They apply to both families (lucid's CoAtNet, timm's CoAtNets) through the
same interface on their attention blocks (``relative_bias``, ``bake_bias``, ``fold_scale``,
``QKV``); BatchNorm and layer-scale folding know each family's blocks.

The order matters: :func:`fold_attention_scales` scales the query rows of the qkv (out, in)
weight, so it runs before :func:`transpose_token_linears` moves that weight to (in, out).

Every rewritten weight is written into the memory of the weight it replaces (:func:`rewritten`),
so the export never holds a weight twice: a checkpoint's memory-mapped pages are replaced in
place (copy-on-write; the file is never written), not kept alive beside a copy."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from models import CoAtNet, TimmCoAtNet
from models.coatnet import PreNorm, Transformer
from models.timm_coatnet import (
    ConvNeXtBlock,
    LayerScale,
    MbConvBlock,
    NormAct,
    NormThenPool,
    Pointwise,
    Stem,
    TokenBatchNorm,
    TransformerBlock,
)

COMPACT_SHARE = 0.5
"""Relative biases are baked in full unless they would add more than this share of the fp32
weights' size; then each block keeps its small table and the graph gathers it with one index
shared by the blocks of a stage (coatnet_rmlp_2_rw_384's full biases would double its file)."""


def bake_relative_biases(model: CoAtNet | TimmCoAtNet) -> int:
    """Turn every relative position (table lookup or MLP) into constants; returns the bytes
    added: full (1, heads, N, N) biases, or tables and shared indices (see COMPACT_SHARE)."""
    blocks = model.attention_blocks()
    weights = sum(p.numel() * 4 for p in model.parameters())
    full = sum(4 * a.num_heads * a.num_tokens**2 for a in blocks)
    if full <= COMPACT_SHARE * weights:
        return sum(a.bake_bias().nbytes for a in blocks)
    indices: dict[int, torch.Tensor] = {}
    added = 0
    for attention in blocks:
        index = indices.get(attention.num_tokens)
        if index is None:
            index = attention.relative_bias_index().reshape(-1).clone()
            indices[attention.num_tokens] = index
            added += index.nbytes
        added += attention.bake_bias(index).nbytes
    return added


def fold_attention_scales(model: CoAtNet | TimmCoAtNet) -> int:
    """Move each attention block's score scale into its query weights; returns how many.

    onnxruntime fuses the scale into the fp32 MatMul anyway, but an int8 model would keep it
    as a float Mul over every (heads, N, N) score tensor.
    """
    blocks = model.attention_blocks()
    for attention in blocks:
        attention.fold_scale()
    return len(blocks)


@torch.no_grad()
def rewritten(old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    """``new``'s values (any shape, as many elements as ``old``) stored in ``old``'s memory."""
    if old.numel() != new.numel() or not old.is_contiguous():
        return nn.Parameter(new.contiguous())
    flat = old.detach().view(-1)
    flat.copy_(new.reshape(-1))
    return nn.Parameter(flat.view(new.shape))


class TransposedLinear(nn.Module):
    """``x @ weight + bias`` with the weight stored as (in, out): a linear layer on tokens
    that exports as MatMul on the weight as it is, with no transposed copy to fold (from an
    nn.Linear, or a 1x1 convolution applied to tokens)."""

    def __init__(self, linear: nn.Linear | Pointwise) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.weight = rewritten(weight, weight.flatten(1).t().contiguous())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None and x.ndim == 2:  # one Gemm with its bias
            return torch.addmm(self.bias, x, self.weight)
        out = x @ self.weight
        return out if self.bias is None else out + self.bias


@torch.no_grad()
def transpose_token_linears(model: CoAtNet | TimmCoAtNet) -> int:
    """Store the weights of the linear layers on tokens as (in, out); returns how many.

    The exporter writes ``x W^T`` on 3-D tokens as MatMul on a transposed weight, which the
    graph optimiser folds into a non-contiguous array that is slow to save; the same product
    on a pre-transposed weight needs neither, and keeps each weight's name.
    """
    if isinstance(model, TimmCoAtNet):
        return _replace(model, Pointwise, TransposedLinear)
    replaced = 0
    for block in model.modules():
        if not isinstance(block, Transformer):
            continue
        attention: Any = block.attn.get_submodule("1.fn")
        feed_forward = block.ff.get_submodule("1.fn.ff")
        for parent, name in (
            (attention, "to_qkv"),
            (attention.to_out, "0"),
            (feed_forward, "0"),
            (feed_forward, "3"),
        ):
            linear = getattr(parent, name)
            setattr(parent, name, TransposedLinear(linear).train(linear.training))
            replaced += 1
    return replaced


class SplitProjection(nn.Module):
    """A linear layer whose output is read in equal parts (queries, keys, values), as one
    (in, out / parts) weight (and bias) per part: ``forward`` returns the parts, and the
    export writes one MatMul per part instead of one MatMul and a Split that copies its output
    (exact; coatnet_0 fp32 about 2 % faster in onnxruntime). The parts are consecutive views of
    the original weight's memory."""

    def __init__(self, linear: TransposedLinear, parts: int) -> None:
        super().__init__()
        weight = linear.weight.detach()
        rows, cols = weight.shape
        stacked = weight.reshape(rows, parts, cols // parts).transpose(0, 1).contiguous()
        self.parts = nn.ParameterList(rewritten(weight, stacked).unbind(0))
        biases = [] if linear.bias is None else linear.bias.detach().chunk(parts)
        self.biases = nn.ParameterList(nn.Parameter(b.contiguous()) for b in biases)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(self.biases) == 0:
            return tuple(x @ weight for weight in self.parts)
        return tuple(torch.addmm(b, x, w) for w, b in zip(self.parts, self.biases, strict=True))


@torch.no_grad()
def use_onnx_attention(model: CoAtNet | TimmCoAtNet) -> int:
    """Export every attention block as one ONNX ``Attention`` operator (opset 23) fed by three
    projections; returns how many. Runs after :func:`transpose_token_linears` (and, for timm,
    :func:`fold_attention_scales`, which groups the per-head qkv channels). The eager model's
    arithmetic is unchanged: this selects the traced path and splits the weights."""
    blocks = model.attention_blocks()
    for attention in blocks:
        attention.onnx_attention = True
        projection = getattr(attention, attention.QKV)
        split = SplitProjection(projection, 3).train(attention.training)
        setattr(attention, attention.QKV, split)
    return len(blocks)


@torch.no_grad()
def fold_batchnorms(model: CoAtNet | TimmCoAtNet) -> int:
    """Fold every eval-mode BatchNorm into an adjacent convolution; returns how many were folded.

    A timm model's norms and layer scales fold as :func:`fold_timm` says.

    A BatchNorm right after a convolution is folded into it (torch's own fusion). The
    pre-norm BatchNorm of an MBConv block is folded into the block's first convolution, a
    1x1 without padding, where the per-channel affine on its input is exact.
    """
    if isinstance(model, TimmCoAtNet):
        return fold_timm(model)
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, bn = module[i], module[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    module[i] = _fold_output_norm(conv, bn)
                    module[i + 1] = nn.Identity().train(bn.training)
                    folded += 1
        if (
            isinstance(module, PreNorm)
            and isinstance(module.norm, nn.BatchNorm2d)
            and isinstance(module.fn, nn.Sequential)
            and _is_pointwise(module.fn[0])
        ):
            module.fn[0] = _fold_input_affine(cast(nn.Conv2d, module.fn[0]), module.norm)
            module.norm = nn.Identity().train(module.norm.training)
            folded += 1
    return folded


def _is_pointwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.padding == (0, 0)
        and module.groups == 1
    )


def _fold_input_affine(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv(bn(x)) as one convolution: W' = W * s over input channels, b' = b + W @ t."""
    scale, shift = _bn_affine(bn)
    bias = conv.weight.flatten(1) @ shift
    if conv.bias is not None:
        bias = bias + conv.bias
    conv.weight.mul_(scale[None, :, None, None])
    conv.bias = nn.Parameter(bias)
    return conv


def _fold_output_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """bn(conv(x)) as one convolution: W' = W * s over output channels, b' = (b - mean) s + beta
    (torch's fuse_conv_bn_eval, without its copy of the convolution)."""
    scale, shift = _bn_affine(bn)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.weight.mul_(scale.reshape((-1,) + (1,) * (conv.weight.ndim - 1)))
    conv.bias = nn.Parameter(bias)
    return conv


def _replace(model: nn.Module, kind: type, make) -> int:
    """Replace every submodule of type ``kind`` by ``make(module)``; returns how many. One at a
    time, so that each original is freed before the next copy is made."""
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is kind
    ]
    for parent, name in targets:
        child = getattr(parent, name)
        setattr(parent, name, make(child).train(child.training))
        del child
    return len(targets)


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel, then an activation: an eval-mode BatchNorm that no
    convolution is next to (its input is a residual sum or a squeeze-excite product), exported
    as Mul and Add instead of a BatchNormalization node."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, norm: nn.BatchNorm2d, act: nn.Module) -> None:
        super().__init__()
        scale, shift = _bn_affine(norm)
        self.register_buffer("scale", scale[:, None, None].contiguous())
        self.register_buffer("shift", shift[:, None, None].contiguous())
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x * self.scale + self.shift)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and shift of an eval-mode BatchNorm."""
    mean, var = bn.running_mean, bn.running_var
    assert mean is not None and var is not None  # tracked statistics: eval mode uses them
    scale = bn.weight / torch.sqrt(var + bn.eps)
    return scale, bn.bias - mean * scale


def _fold_into_conv(conv: nn.Conv2d, norm: NormAct) -> tuple[nn.Conv2d, nn.Module]:
    """conv then norm-act -> (the fused convolution, the activation alone)."""
    return _fold_output_norm(conv, norm), norm.act


def _fold_input_norm(
    layer: nn.Conv2d | Pointwise | nn.Linear, norm: nn.BatchNorm2d
) -> nn.Conv2d | Pointwise | nn.Linear:
    """layer(norm(x)) as one layer with a bias: the weight scaled over its input channels.

    Exact for a 1x1 convolution or a linear layer, also across an average pool between them
    (a per-channel affine commutes with averaging)."""
    if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1):
        raise ValueError("only a 1x1 convolution takes its input's norm")
    scale, shift = _bn_affine(norm)
    shape = (1, -1) + (1,) * (layer.weight.ndim - 2)
    bias = layer.weight.flatten(1) @ shift
    if layer.bias is not None:
        bias = bias + layer.bias
    layer.weight.mul_(scale.reshape(shape))
    layer.bias = nn.Parameter(bias)
    return layer


def _fold_scale_into(layer: nn.Conv2d | Pointwise, scale: LayerScale) -> None:
    """layer then a layer scale -> the layer's output rows scaled."""
    gamma = scale.gamma.detach()
    shape = (-1,) + (1,) * (layer.weight.ndim - 1)
    bias = layer.bias
    assert bias is not None  # the layers before a layer scale are biased
    layer.weight.mul_(gamma.reshape(shape))
    layer.bias = nn.Parameter(bias * gamma)


@torch.no_grad()
def fold_timm(model: TimmCoAtNet) -> int:
    """Fold a timm model's norms and layer scales into its convolutions and linear layers;
    returns the BatchNorms removed (folded, or left as a Mul and an Add where no layer is
    next to them: the pre-norm with an activation, the norm after an early squeeze-excite)."""
    stem = model.stem
    folded = 0
    if isinstance(stem, Stem) and isinstance(stem.norm1, NormAct):
        stem.conv1, stem.norm1 = _fold_into_conv(stem.conv1, stem.norm1)
        folded += 1
    for block in model.blocks():
        if isinstance(block, MbConvBlock):
            folded += _fold_mbconv(block)
        elif isinstance(block, TransformerBlock):
            folded += _fold_transformer(block)
        elif isinstance(block, ConvNeXtBlock) and isinstance(block.ls, LayerScale):
            _fold_scale_into(block.mlp.fc2, block.ls)
            block.ls = nn.Identity()
    if isinstance(model.norm, TokenBatchNorm):  # the mean over tokens commutes with it
        model.head.fc = _fold_input_norm(model.head.fc, model.norm)
        model.norm = nn.Identity()
        folded += 1
    return folded


def _fold_mbconv(block: MbConvBlock) -> int:
    if isinstance(block.pre_norm.act, nn.Identity):
        block.conv1_1x1 = _fold_input_norm(block.conv1_1x1, block.pre_norm)
        block.pre_norm = nn.Identity()
    else:
        block.pre_norm = ChannelAffine(block.pre_norm, block.pre_norm.act)
    block.conv1_1x1, block.norm1 = _fold_into_conv(block.conv1_1x1, block.norm1)
    if block.se_early is None:
        block.conv2_kxk, block.norm2 = _fold_into_conv(block.conv2_kxk, block.norm2)
    else:
        block.norm2 = ChannelAffine(block.norm2, block.norm2.act)
    return 3


def _fold_transformer(block: TransformerBlock) -> int:
    folded = 0
    first = block.norm1.norm if isinstance(block.norm1, NormThenPool) else block.norm1
    if isinstance(first, TokenBatchNorm) and _commutes_with_pool(block.norm1):
        block.attn.qkv = _fold_input_norm(block.attn.qkv, first)
        if isinstance(block.norm1, NormThenPool):
            block.norm1.norm = nn.Identity()
        else:
            block.norm1 = nn.Identity()
        folded += 1
    if isinstance(block.norm2, TokenBatchNorm):
        block.mlp.fc1 = _fold_input_norm(block.mlp.fc1, block.norm2)
        block.norm2 = nn.Identity()
        folded += 1
    if isinstance(block.ls1, LayerScale):
        _fold_scale_into(block.attn.proj, block.ls1)
        block.ls1 = nn.Identity()
    if isinstance(block.ls2, LayerScale):
        _fold_scale_into(block.mlp.fc2, block.ls2)
        block.ls2 = nn.Identity()
    return folded


def _commutes_with_pool(norm1: nn.Module) -> bool:
    """An affine norm moves past an average pool, not past a max pool."""
    return not isinstance(norm1, NormThenPool) or isinstance(norm1.down.pool, nn.AvgPool2d)
