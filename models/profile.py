"""Size and cost of a CoAtNet, computed without allocating its weights."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.coatnet import CoAtNet


def count_parameters(model: CoAtNet) -> int:
    """Number of parameters (works on meta-device models)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: CoAtNet, batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass at the model's resolution (convolutions and
    matrix products, as torch's flop counter sees them), for ``batch`` images.

    Runs on the meta device when the model is there, so even coatnet_7 costs no memory.
    """
    device = next(model.parameters()).device
    x = torch.empty(batch, model.in_channels, *model.img_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2
