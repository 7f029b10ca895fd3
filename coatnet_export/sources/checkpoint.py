"""Reading checkpoints without executing code, and fitting their tensors to a model."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from coatnet_export.errors import InputError
from coatnet_export.output import check_input_file
from coatnet_export.sources import CHECKPOINT_FORMATS, CheckpointFormat  # noqa: F401
from coatnet_export.sources.lucid import looks_like_lucid, read_lcd, to_tensors
from models import CoAtNet
from models.coatnet import STAGE_STRIDES

StateDict = dict[str, torch.Tensor]

DERIVED_KEYS = ("relative_index", "num_batches_tracked")
"""Key suffixes that are derived or bookkeeping: never required, never an error if present."""

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
"""Keys under which training scripts commonly nest the state dict."""


@dataclass
class Checkpoint:
    """Tensors read from a file, and which framework wrote them."""

    state_dict: StateDict
    format: Literal["torch", "lucid"]
    path: Path


def read_checkpoint(path: Path, fmt: CheckpointFormat = "auto") -> Checkpoint:
    """Read a PyTorch or lucid checkpoint without executing code; ``auto`` tells them apart.

    ``.lcd`` files are lucid's; a ``.safetensors`` file is lucid's when it carries lucid's
    traces (saved relative indices, float64 BatchNorm statistics); anything else is torch's.
    """
    if fmt == "torch" and path.suffix == ".lcd":
        raise InputError(f"{path} is a lucid .lcd file; use --checkpoint-format lucid (or auto)")
    if path.suffix == ".lcd":
        check_input_file(path, "checkpoint", "give the path of a lucid .lcd file")
        state_dict = to_tensors(read_lcd(path))
        check_tensors(state_dict, path)
        return Checkpoint(state_dict, "lucid", path)
    state_dict = read_torch_state_dict(path)
    check_tensors(state_dict, path)
    if fmt == "auto":
        fmt = "lucid" if looks_like_lucid(state_dict) else "torch"
    return Checkpoint(state_dict, fmt, path)


def read_torch_state_dict(path: Path) -> StateDict:
    """Tensors of a ``.pt``/``.pth``/``.bin`` (weights only) or ``.safetensors`` file."""
    check_input_file(path, "checkpoint", "give the path of a .pt, .pth or .safetensors file")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(
                f"checkpoint {path} is not a readable safetensors file ({exc})"
            ) from None
    try:
        # memory-map zip checkpoints so big weights are not read twice; legacy pickles cannot be
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            loaded = torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise InputError(
            f"refused to load {path}: it holds objects other than tensors, and unpickling it could "
            f"run code ({first_line}); save a plain state_dict or a .safetensors file"
        ) from None
    except Exception as exc:  # torch.load raises many types for damaged or foreign files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"checkpoint {path} is not a readable PyTorch file ({reason})") from None
    return _as_state_dict(loaded, path)


def _as_state_dict(loaded: object, path: Path) -> StateDict:
    if isinstance(loaded, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise InputError(
            f"checkpoint {path} is not a state dict (expected a mapping of parameter "
            f"names to tensors, got {type(loaded).__name__})"
        )
    not_strings = [repr(k) for k in loaded if not isinstance(k, str)]
    if not_strings:
        raise InputError(
            f"checkpoint {path} is not a state dict: its keys {_names(not_strings)} are not "
            "strings (parameter names)"
        )
    not_tensors = [k for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise InputError(
            f"checkpoint {path} is not a state dict: {_names(not_tensors)} are not tensors"
        )
    prefix = "module." if all(k.startswith("module.") for k in loaded) else ""
    # chinhsuanwu/coatnet-pytorch names the feed-forward Sequential "net" where lucid says "ff"
    return {k[len(prefix) :].replace(".fn.net.", ".fn.ff."): v for k, v in loaded.items()}


def check_tensors(state_dict: StateDict, path: Path) -> None:
    """Refuse tensors no model can use: without data (meta), sparse, of a non-float dtype
    where weights belong (derived index keys may be integers), or holding NaN or Inf."""
    problems: list[str] = []
    for key, tensor in state_dict.items():
        if tensor.is_meta:
            problems.append(f"{key} is a meta tensor (it holds no data)")
        elif tensor.layout != torch.strided:
            problems.append(f"{key} is a {tensor.layout} tensor (save dense tensors)")
        elif key.endswith(DERIVED_KEYS):
            continue
        elif not tensor.is_floating_point():
            problems.append(
                f"{key} has dtype {str(tensor.dtype).removeprefix('torch.')}, not float"
            )
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(f"{key} holds NaN or infinite values")
        if len(problems) > 3:
            break
    if problems:
        raise InputError(
            f"checkpoint {path} holds unusable tensors: {'; '.join(problems[:3])}"
            + (" (and more)" if len(problems) > 3 else "")
            + " (save the trained float weights)"
        )


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def _is_bias_table(key: str) -> bool:
    return key.endswith("relative_bias_table")


def trained_img_size(state_dict: StateDict) -> tuple[int, int] | None:
    """The input resolution whose bias-table sizes match the checkpoint's, if one does.

    Searches heights and widths that are multiples of 32 up to 2048 for the one that explains
    every table (each table covers a (2h-1) x (2w-1) grid at its stage's resolution).
    """
    tables = {
        key: (state_dict[key].shape[0], stride)
        for key in state_dict
        if _is_bias_table(key)
        and state_dict[key].ndim == 2
        and (stride := _stage_stride(key)) is not None
    }
    if not tables or len(tables) != sum(1 for key in state_dict if _is_bias_table(key)):
        return None
    sizes = range(32, 2049, 32)
    squares_first = [(h, h) for h in sizes] + [(h, w) for h in sizes for w in sizes if h != w]
    for height, width in squares_first:
        if all(
            (2 * (height // s) - 1) * (2 * (width // s) - 1) == rows for rows, s in tables.values()
        ):
            return height, width
    return None


def _stage_stride(key: str) -> int | None:
    """The stride of the stage a key belongs to (``s3.1.…`` -> 16), None if it names none."""
    stage = key.split(".", 1)[0]
    if stage == "s3_tandem":
        return STAGE_STRIDES[3]
    if len(stage) == 2 and stage[0] == "s" and stage[1] in "01234":
        return STAGE_STRIDES[int(stage[1])]
    return None


def resize_bias_table(
    table: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> torch.Tensor:
    """Bicubic resize of a (rows, heads) table from one (2h-1, 2w-1) grid to another."""
    heads = table.shape[1]
    grid = table.float().T.reshape(1, heads, *src_grid)
    resized = F.interpolate(grid, size=dst_grid, mode="bicubic", align_corners=False)
    return resized.reshape(heads, -1).T.contiguous().to(table.dtype)


def check_fit(tensors: StateDict, expected: dict[str, torch.Size], wrong: list[str]) -> None:
    """Name every missing, unexpected and wrongly shaped key (expected vs found)."""
    missing = [k for k in expected if k not in tensors and not k.endswith(DERIVED_KEYS)]
    unexpected = [k for k in tensors if k not in expected]
    parts = []
    if wrong:
        described = [f"{k} {tuple(tensors[k].shape)} != {tuple(expected[k])}" for k in wrong]
        parts.append(
            f"{len(wrong)} wrongly shaped key(s), checkpoint != model: {_names(described, 3)}"
        )
    if missing:
        parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
    if parts:
        raise InputError(
            "checkpoint does not fit the model: "
            + "; ".join(parts)
            + " (check --variant, --img-size, --num-classes and --in-channels)"
        )


def fit_state_dict(state_dict: StateDict, model: CoAtNet) -> tuple[StateDict, list[str]]:
    """Check a state dict against a model and adapt it; returns (tensors, warnings).

    Derived keys are dropped, tensors become float32, and bias tables trained at another
    resolution are resized over the new grid (with a warning). Missing, unexpected or
    wrongly shaped keys raise :class:`InputError` naming them.
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in state_dict.items() if not k.endswith(DERIVED_KEYS)}
    warnings = []
    wrong = [k for k in tensors if k in expected and tensors[k].shape != expected[k]]
    wrong_tables = [k for k in wrong if _is_bias_table(k)]
    source = trained_img_size(tensors) if wrong_tables and len(wrong_tables) == len(wrong) else None
    if source is not None:
        for key in wrong_tables:
            stride = _stage_stride(key) or 1  # a resized table has a stage
            src = (2 * (source[0] // stride) - 1, 2 * (source[1] // stride) - 1)
            dst = (2 * (model.img_size[0] // stride) - 1, 2 * (model.img_size[1] // stride) - 1)
            tensors[key] = resize_bias_table(tensors[key], src, dst)
        warnings.append(
            f"checkpoint bias tables were trained at {source[0]}x{source[1]}; resized "
            f"{len(wrong_tables)} table(s) to {model.img_size[0]}x{model.img_size[1]} "
            "(bicubic): accuracy may change, fine-tune at the new size if it matters"
        )
        wrong = []
    check_fit(tensors, expected, wrong)
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, warnings
