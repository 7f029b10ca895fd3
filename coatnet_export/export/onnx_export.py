"""Turn the (baked, folded) PyTorch model into an ONNX file with either torch exporter."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from coatnet_export.console import quiet_libraries
from coatnet_export.errors import InputError

if TYPE_CHECKING:  # torch loads when a model is exported, not when the CLI starts
    from models import CoAtNet, TimmCoAtNet

Exporter = Literal["dynamo", "torchscript"]
EXPORTERS: tuple[Exporter, ...] = ("dynamo", "torchscript")
AttentionGraph = Literal["fused", "matmul"]
ATTENTION_GRAPHS: tuple[AttentionGraph, ...] = ("fused", "matmul")
"""fused: one ONNX ``Attention`` node per block (opset 23, dynamo); matmul: MatMul -> Add ->
Softmax -> MatMul with the head reshapes and transposes around it."""
FUSED_ATTENTION_OPSET = 23
DEFAULT_OPSET: dict[Exporter, int] = {"dynamo": FUSED_ATTENTION_OPSET, "torchscript": 17}
"""Opset 23 gives the dynamo exporter ONNX's Attention (and, from 20, its Gelu); the
TorchScript exporter's GELU pattern is fused by onnxruntime at opset 17 already."""

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"


def fused_attention_unavailable(exporter: Exporter, opset: int) -> tuple[str, str] | None:
    """Why the fused attention cannot be exported with these settings, and the fix (None: it
    can)."""
    if exporter != "dynamo":
        return "the TorchScript exporter cannot emit ONNX Attention", "use --exporter dynamo"
    if opset < FUSED_ATTENTION_OPSET:
        return (
            f"ONNX Attention exists from opset {FUSED_ATTENTION_OPSET}, not {opset}",
            f"use --opset {FUSED_ATTENTION_OPSET} or leave --opset out",
        )
    import torch

    try:
        from torch.onnx.ops import attention  # noqa: F401  (older torch lacks it)
    except ImportError:
        return f"torch {torch.__version__} has no torch.onnx.ops.attention", "upgrade torch"
    return None


def choose_attention(
    exporter: Exporter, opset: int, requested: AttentionGraph | None
) -> AttentionGraph:
    """The attention graph to export: ``requested``, or fused where the settings allow it.

    Raises :class:`InputError` for ``fused`` where it cannot be exported.
    """
    unavailable = fused_attention_unavailable(exporter, opset)
    if requested is None:
        return "matmul" if unavailable else "fused"
    if requested == "fused" and unavailable:
        reason, fix = unavailable
        raise InputError(f"--attention fused: {reason} ({fix}, or pass --attention matmul)")
    return requested


@dataclass(frozen=True)
class GraphChoice:
    """How the graph is exported, resolved once from the options."""

    exporter: Exporter
    opset: int
    attention: AttentionGraph


def choose_graph(
    exporter: Exporter, opset: int | None, attention: AttentionGraph | None
) -> GraphChoice:
    """The exporter's default opset unless one is given, and :func:`choose_attention`."""
    opset = opset or DEFAULT_OPSET[exporter]
    return GraphChoice(exporter, opset, choose_attention(exporter, opset, attention))


def export_onnx(
    model: CoAtNet | TimmCoAtNet,
    path: Path,
    exporter: Exporter,
    opset: int,
    batch: int | None,
    external_data: bool,
) -> None:
    """Export ``model`` to ``path``; ``batch=None`` makes the batch axis (only) dynamic.

    ``external_data`` writes the weights to ``<path>.data`` beside the model (dynamo); the
    TorchScript exporter always writes one file, which the packaging step converts if needed.
    """
    import torch

    example = torch.zeros(2 if batch is None else batch, model.in_channels, *model.img_size)
    with quiet_libraries(), torch.no_grad():
        if exporter == "dynamo":
            dynamic_shapes = (
                None if batch is not None else ({0: torch.export.Dim(BATCH_DIM, min=1, max=65536)},)
            )
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes,
                external_data=external_data,
                optimize=True,
                verbose=False,
            )
        else:
            dynamic_axes = (
                None
                if batch is not None
                else {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}}
            )
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )


def release_exporter_memory() -> None:
    """Let the weights of an exported model be freed, and hand freed memory back to the OS.

    onnxscript's module-level rewrite rules keep their last match, which holds a node of the
    exported graph and through it every weight of the model, after the export returns
    (onnxscript 0.7). Resetting that state is what lets the reference model's memory go
    before onnxruntime loads the same weights.
    """
    kinds: tuple[type, ...] = ()  # a future onnxscript without the module has nothing to reset
    with contextlib.suppress(ImportError):
        from onnxscript.rewriter._matcher import SimplePatternMatcher

        kinds = (SimplePatternMatcher,)
    with warnings.catch_warnings():  # isinstance on every object wakes deprecated lazy modules
        warnings.simplefilter("ignore")
        matchers: list[Any] = [obj for obj in gc.get_objects() if isinstance(obj, kinds)]
    for matcher in matchers:
        with contextlib.suppress(AttributeError, TypeError):  # private API: best effort
            matcher._init_match(0)
            setattr(matcher, "_graph", None)  # noqa: B010 (a private attribute, best effort)
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
