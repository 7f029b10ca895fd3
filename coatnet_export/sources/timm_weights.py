"""Fitting a timm CoAtNet state dict to our model, as timm's ``checkpoint_filter_fn`` does.

1x1 weights are accepted as 2-D or 4-D, and bias tables trained at another resolution are
resized with timm's own method (``resize_rel_pos_bias_table`` without scipy: a linear
interpolation over a geometric progression of offsets, BEiT-style). The MLP variants need no
resizing: their MLP simply runs over the new offsets.
"""

from __future__ import annotations

from typing import cast

import torch

from coatnet_export.sources.checkpoint import StateDict, check_fit
from models import TimmCoAtNet

TIMM_DERIVED = ("relative_position_index", "rel_coords_log")
"""Non-persistent buffers of timm: never in a checkpoint, dropped if one holds them."""
TABLE = "relative_position_bias_table"


def looks_like_timm(state_dict: StateDict) -> bool:
    """Whether a state dict has the keys of timm's MaxxVit (stem.conv1, stages.N.blocks.M)."""
    return "stem.conv1.weight" in state_dict and any(
        k.startswith("stages.0.blocks.") for k in state_dict
    )


def fit_timm_state_dict(state_dict: StateDict, model: TimmCoAtNet) -> tuple[StateDict, list[str]]:
    """Adapt a timm state dict to ``model``; returns (float32 tensors, warnings).

    Missing, unexpected or wrongly shaped keys raise :class:`InputError` naming them.
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in state_dict.items() if not k.endswith(TIMM_DERIVED)}
    for key, tensor in tensors.items():
        shape = expected.get(key)
        if shape is not None and tensor.ndim != len(shape) and tensor.numel() == shape.numel():
            tensors[key] = tensor.reshape(shape)  # 2-D <-> 4-D 1x1 weights, as timm accepts
    resized = [
        key
        for key, tensor in tensors.items()
        if key.endswith(TABLE)
        and key in expected
        and tensor.shape != expected[key]
        and _square_grid(tensor)
    ]
    for key in resized:
        grid = cast("tuple[int, int]", model.get_submodule(key[: -len(TABLE) - 1]).size)
        tensors[key] = resize_bias_table(tensors[key], grid)
    warnings = []
    if resized:
        warnings.append(
            f"resized {len(resized)} relative-position table(s) to {model.img_size[0]}x"
            f"{model.img_size[1]} as timm does (accuracy may change; fine-tune at the new size "
            "if it matters)"
        )
    wrong = [k for k in tensors if k in expected and tensors[k].shape != expected[k]]
    check_fit(tensors, expected, wrong)
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, warnings


def _square_grid(table: torch.Tensor) -> bool:
    """Whether a table covers a square (2s-1) x (2s-1) grid of offsets, as timm's resizing
    assumes (a table trained at a non-square size is reported as wrongly shaped instead)."""
    side = round(table.shape[0] ** 0.5) if table.ndim == 2 else 0
    return side * side == table.shape[0] and side % 2 == 1


def _offsets(source: int, target: int) -> torch.Tensor:
    """timm's source positions for ``source`` table rows that must span ``target`` rows: a
    geometric progression out from 0 whose ratio makes the outermost reach ``target // 2``."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        ratio = (left + right) / 2.0
        if (1.0 - ratio ** (source // 2)) / (1.0 - ratio) > target // 2:
            right = ratio
        else:
            left = ratio
    distances, current = [], 1.0
    for i in range(source // 2):
        distances.append(current)
        current += ratio ** (i + 1)
    return torch.tensor([-d for d in reversed(distances)] + [0.0] + distances)


def _interpolate(points: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Left and right neighbours of each of ``at`` among ``points`` and the distances to
    them, with timm's RegularGridInterpolator's conventions at and beyond the ends."""
    right = torch.bucketize(at, points).clamp(max=len(points) - 1)
    left = (right - 1).clamp(0, len(points) - 1)
    d_left = (at - points[left]).clamp(min=0)
    d_right = (points[right] - at).clamp(min=0)
    both_zero = (d_left == 0) & (d_right == 0)
    d_left = torch.where(both_zero, torch.ones_like(d_left), d_left)
    d_right = torch.where(both_zero, torch.ones_like(d_right), d_right)
    return left, right, d_left, d_right


def resize_bias_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A square ((2s-1)^2, heads) table resized to the offsets of a ``grid`` (h, w) map, with
    timm's ``resize_rel_pos_bias_table`` (its interpolation without scipy)."""
    rows, heads = table.shape
    src = int(rows**0.5)
    dst = (2 * grid[0] - 1, 2 * grid[1] - 1)
    y_points, x_points = _offsets(src, dst[0]), _offsets(src, dst[1])
    y_at = torch.arange(-(dst[0] // 2), dst[0] // 2 + 0.1, 1.0)
    x_at = torch.arange(-(dst[1] // 2), dst[1] // 2 + 0.1, 1.0)
    y_at, x_at = (t.contiguous() for t in torch.meshgrid(y_at, x_at, indexing="ij"))
    y0, y1, dy0, dy1 = _interpolate(y_points, y_at)
    x0, x1, dx0, dx1 = _interpolate(x_points, x_at)
    values = table.float().t().reshape(heads, src, src)
    numerator = (
        values[:, y0, x0] * dy1 * dx1
        + values[:, y0, x1] * dy1 * dx0
        + values[:, y1, x0] * dy0 * dx1
        + values[:, y1, x1] * dy0 * dx0
    )
    resized = numerator / ((dy0 + dy1) * (dx0 + dx1))
    return resized.reshape(heads, -1).t().contiguous().to(table.dtype)
