"""Read a CoAtNet architecture off a checkpoint's keys and shapes (lucid's or timm's), and
compare it with a variant."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from coatnet_export.errors import InputError
from models import TIMM_VARIANTS, VARIANTS, Tandem, TimmSpec, VariantSpec

StateDict = Mapping[str, torch.Tensor]

CUSTOM_NAME = "coatnet_custom"
"""Name of an architecture read from a checkpoint that is none of the registered variants."""

_BLOCK = re.compile(r"^(s[0-4]|s3_tandem\.[01])\.(\d+)\.")


def _depth(state_dict: StateDict, stage: str) -> int:
    indices = {
        int(m.group(2)) for k in state_dict if (m := _BLOCK.match(k)) and m.group(1) == stage
    }
    return max(indices) + 1 if indices else 0


def _block_type(state_dict: StateDict, stage: str) -> str:
    if f"{stage}.0.conv.norm.weight" in state_dict:
        return "C"
    if f"{stage}.0.attn.1.fn.to_qkv.weight" in state_dict:
        return "T"
    raise InputError(
        f"checkpoint stage {stage} has neither MBConv nor Transformer blocks; is "
        "this a CoAtNet checkpoint?"
    )


def dim(state_dict: StateDict, key: str, axis: int) -> int:
    """Size of ``axis`` of a checkpoint tensor; an InputError if the key or the axis is missing."""
    if key not in state_dict:
        raise InputError(f"checkpoint has no {key}: is this a CoAtNet checkpoint?")
    shape = tuple(state_dict[key].shape)
    if len(shape) <= axis:
        raise InputError(
            f"checkpoint tensor {key} has shape {shape}, but a CoAtNet's has at least "
            f"{axis + 1} dimension(s)"
        )
    return int(shape[axis])


def _width(state_dict: StateDict, stage: str, block_type: str) -> int:
    key = f"{stage}.0.conv.fn.8.weight" if block_type == "C" else f"{stage}.0.ff.1.fn.ff.3.weight"
    return dim(state_dict, key, 0)


def infer_architecture(state_dict: StateDict) -> VariantSpec:
    """The architecture a checkpoint was trained with, named after a variant when it is one.

    Depths come from the block indices, widths from the last layer of each stage's first block,
    heads from the bias tables, and a ``s3_tandem`` stage becomes a :class:`Tandem`.
    """
    if "s0.0.0.weight" not in state_dict or "fc.weight" not in state_dict:
        raise InputError(
            "checkpoint has no s0.0.0.weight or fc.weight: it is not a CoAtNet "
            "state dict with lucid's key names"
        )
    tandem = None
    num_blocks = [_depth(state_dict, "s0")]
    channels = [dim(state_dict, "s0.0.0.weight", 0)]
    block_types = []
    for stage in ("s1", "s2", "s3", "s4"):
        if stage == "s3" and _depth(state_dict, "s3_tandem.0"):
            depths = (_depth(state_dict, "s3_tandem.0"), _depth(state_dict, "s3_tandem.1"))
            widths = (
                _width(state_dict, "s3_tandem.0", "C"),
                _width(state_dict, "s3_tandem.1", "T"),
            )
            tandem = Tandem(depths, widths)
            num_blocks.append(depths[0])
            channels.append(widths[0])
            block_types.append("T")
            continue
        depth = _depth(state_dict, stage)
        if depth == 0:
            raise InputError(f"checkpoint has no blocks for stage {stage}")
        block_type = _block_type(state_dict, stage)
        num_blocks.append(depth)
        channels.append(_width(state_dict, stage, block_type))
        block_types.append(block_type)
    tables = [k for k in state_dict if k.endswith("relative_bias_table")]
    num_heads = dim(state_dict, tables[0], 1) if tables else 32
    spec = VariantSpec(
        CUSTOM_NAME, tuple(num_blocks), tuple(channels), num_heads, tandem, tuple(block_types)
    )
    for known in VARIANTS.values():
        if _same_architecture(spec, known):
            return known
    return spec


def _fields(spec: VariantSpec) -> dict[str, Any]:
    return {
        "num_blocks": spec.num_blocks,
        "channels": spec.channels,
        "num_heads": spec.num_heads,
        "block_types": spec.block_types,
        "tandem": spec.tandem,
    }


def _same_architecture(a: VariantSpec, b: VariantSpec) -> bool:
    fa, fb = _fields(a), _fields(b)
    if a.tandem is not None or b.tandem is not None:  # S3's list entries are unused there
        for key in ("num_blocks", "channels"):
            fa[key] = tuple(v for i, v in enumerate(fa[key]) if i != 3)
            fb[key] = tuple(v for i, v in enumerate(fb[key]) if i != 3)
    return fa == fb


def architecture_mismatches(requested: VariantSpec, found: VariantSpec) -> list[str]:
    """Field-by-field differences between a requested variant and a checkpoint's architecture."""
    if _same_architecture(requested, found):
        return []
    mine, theirs = _fields(requested), _fields(found)
    return [
        f"{key}: {requested.name} has {_show(mine[key])}, the checkpoint {_show(theirs[key])}"
        for key in mine
        if mine[key] != theirs[key]
    ]


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, Tandem):
        return f"tandem {list(value.num_blocks)} blocks, widths {list(value.channels)}"
    return str(value)


def recognise_timm(state_dict: StateDict) -> TimmSpec:
    """The timm architecture whose keys and shapes a timm state dict has (relative-position
    tables, whose size depends on the resolution, aside); the first in the table where
    several fit (``coatnet_rmlp_2_rw_224`` and ``_384`` differ only in resolution)."""
    found = _shapes(state_dict)
    for spec in TIMM_VARIANTS.values():
        model = spec.build(
            num_classes=_classes(state_dict),
            in_channels=dim(state_dict, "stem.conv1.weight", 1),
            device="meta",
        )
        if _shapes(model.state_dict()) == found:
            return spec
    raise InputError(
        "the checkpoint has timm's key names but is none of timm's CoAtNet-family "
        f"architectures ({', '.join(TIMM_VARIANTS)}): pass --variant to be told which keys "
        "differ"
    )


def _shapes(state_dict: StateDict) -> dict[str, int]:
    """Key -> element count, without resolution-dependent tables and derived buffers (element
    counts, so that 2-D and 4-D 1x1 weights compare equal)."""
    return {
        key: tensor.numel()
        for key, tensor in state_dict.items()
        if not key.endswith(("relative_position_bias_table", "relative_position_index"))
        and not key.endswith(("rel_coords_log", "num_batches_tracked"))
    }


def _classes(state_dict: StateDict) -> int:
    return dim(state_dict, "head.fc.weight", 0) if "head.fc.weight" in state_dict else 1000
