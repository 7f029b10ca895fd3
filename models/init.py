"""Weights for a CoAtNet: deterministic seeded initialisation and meta-device materialisation."""

from __future__ import annotations

import math

import torch
from torch import nn

from models.coatnet import CoAtNet, RelativeAttention
from models.timm_coatnet import LayerScale, RelPosBias, TimmCoAtNet

BIAS_TABLE_STD = 0.5
"""Spread of the initial relative bias tables: large enough that a wrong index changes outputs."""


def refresh_derived_buffers(model: CoAtNet | TimmCoAtNet) -> CoAtNet | TimmCoAtNet:
    """Recompute the buffers no checkpoint holds (the relative indices) on the weights' device."""
    for attention in model.attention_blocks():
        attention.reset_index()
    return model


def materialize(
    model: CoAtNet | TimmCoAtNet, device: str | torch.device = "cpu"
) -> CoAtNet | TimmCoAtNet:
    """Give a model built on the meta device real, uninitialised storage on ``device``."""
    model.to_empty(device=device)
    return refresh_derived_buffers(model)


@torch.no_grad()
def init_weights(model: CoAtNet | TimmCoAtNet, seed: int) -> CoAtNet | TimmCoAtNet:
    """Fill every parameter and statistic deterministically from ``seed``, in place.

    Weights follow LeCun-normal scaling so activations stay finite through every variant.
    Nothing is trivially zero or one: BatchNorm statistics, norm affines, biases and the
    relative bias tables (and timm's layer scales) are all drawn at random, so that parity
    checks exercise each of them.
    The result depends only on ``seed`` and the architecture, not on torch's global RNG.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def normal(t: torch.Tensor, mean: float, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype).mul_(std).add_(mean))

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            normal(module.weight, 0.0, 1.0 / math.sqrt(fan_in))
            if module.bias is not None:
                normal(module.bias, 0.0, 0.02)
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            normal(module.weight, 1.0, 0.1)
            normal(module.bias, 0.0, 0.1)
            if isinstance(module, nn.BatchNorm2d):
                mean, var, count = (
                    module.running_mean,
                    module.running_var,
                    module.num_batches_tracked,
                )
                assert mean is not None and var is not None and count is not None  # tracked
                normal(mean, 0.0, 0.1)
                var.copy_(torch.rand(var.shape, generator=gen).add_(0.5))
                count.zero_()
        elif isinstance(module, RelativeAttention):
            normal(module.relative_bias_table, 0.0, BIAS_TABLE_STD)
        elif isinstance(module, RelPosBias):
            normal(module.relative_position_bias_table, 0.0, BIAS_TABLE_STD)
        elif isinstance(module, LayerScale):
            normal(module.gamma, 1.0, 0.1)
    return model
