"""Checkpoints of the lucid framework: safe reading, detection, and conversion to our model.

lucid saves ``.safetensors`` files and ``.lcd`` pickles of
``{"type", "format_version", "content": {name: numpy array}}``. Its CoAtNet enumerates the
tokens of the relative index column-major; on a square map that is a transposition of each
bias table's (2S-1, 2S-1) grid, which :func:`convert_lucid_state_dict` undoes.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from coatnet_export.errors import InputError

StateDict = dict[str, torch.Tensor]

ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "scalar"),
}
"""The only callables an ``.lcd`` pickle may name: what numpy arrays in dictionaries need."""


class _RefusedGlobal(Exception):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")


class _LcdUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`; nothing else is imported."""

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _RefusedGlobal(module, name)


def read_lcd(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a lucid ``.lcd`` file, read without executing any code it may hold."""
    try:
        with path.open("rb") as f:
            loaded = _LcdUnpickler(f).load()
    except _RefusedGlobal as exc:
        raise InputError(
            f"refused to load {path}: its pickle names {exc}, but a lucid .lcd holds "
            "only numpy arrays and dictionaries (nothing was executed)"
        ) from None
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc.strerror or exc})") from None
    except Exception as exc:  # truncated or corrupt pickles raise many types
        raise InputError(
            f"{path} is not a readable lucid .lcd file (truncated or corrupt: {type(exc).__name__})"
        ) from None
    content = loaded.get("content") if isinstance(loaded, Mapping) else None
    if not isinstance(content, Mapping):
        raise InputError(
            f"{path} is not a lucid checkpoint: expected a dictionary with a "
            "'content' mapping of names to arrays"
        )
    bad = [
        k
        for k, v in content.items()
        if not isinstance(k, str) or not isinstance(v, np.ndarray) or v.dtype.kind not in "fiub"
    ]
    if bad:
        raise InputError(
            f"{path} holds entries that are not numeric arrays: {', '.join(map(str, bad[:4]))}"
        )
    return dict(content)


def to_tensors(arrays: Mapping[str, np.ndarray]) -> StateDict:
    """numpy arrays as torch tensors (copied, so they own their memory)."""
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def looks_like_lucid(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """lucid saves the derived ``relative_index`` and float64 BatchNorm statistics; torch not."""
    if any(k.endswith("num_batches_tracked") for k in state_dict):
        return False
    return any(k.endswith("relative_index") for k in state_dict) or any(
        k.endswith(("running_mean", "running_var")) and v.dtype == torch.float64
        for k, v in state_dict.items()
    )


def convert_lucid_state_dict(state_dict: StateDict, trained_size: tuple[int, int]) -> StateDict:
    """lucid's tensors in our layout: relative indices dropped, bias tables transposed.

    Only square training resolutions are accepted: on other maps lucid attaches biases to the
    wrong token pairs and pools the head over H only, so its own outputs are wrong there.
    """
    height, width = trained_size
    if height != width:
        raise InputError(
            f"this lucid checkpoint was trained at {height}x{width}; lucid's CoAtNet "
            "is only correct on square inputs (its relative index and head pooling "
            "are wrong on non-square maps), so there is nothing correct to export"
        )
    converted = {}
    for key, tensor in state_dict.items():
        if key.endswith("relative_index"):
            continue
        if key.endswith("relative_bias_table"):
            if tensor.ndim != 2:
                raise InputError(
                    f"{key} has shape {tuple(tensor.shape)}, not (rows, heads) of a bias table"
                )
            rows, heads = tensor.shape
            side = round(rows**0.5)
            if side * side != rows:
                raise InputError(f"{key} has {rows} rows, not a square (2S-1)^2 grid")
            tensor = tensor.reshape(side, side, heads).transpose(0, 1).reshape(rows, heads)
        converted[key] = tensor.contiguous()
    return converted
