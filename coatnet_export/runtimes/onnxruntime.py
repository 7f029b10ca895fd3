"""The onnxruntime CPU runtime: every graph optimisation, optional low-memory loading."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from coatnet_export.errors import InputError
from coatnet_export.runtimes import RunOptions

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter: the size from which a block gets its own mapping."""


def make_session(
    path: Path, threads: int | None = None, low_memory: bool = False, unfused: bool = False
) -> ort.InferenceSession:
    """A CPU session with every graph optimisation enabled (none when ``unfused``), worker
    threads spinning between operators as onnxruntime ships them.

    ``low_memory`` skips weight pre-packing and the arena, so the weights are held once, and
    hands activations back to the OS as they are freed (:func:`unmap_freed_activations`).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if unfused
        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    options.log_severity_level = 4  # errors come back as exceptions: no coloured log line too
    if threads:
        options.intra_op_num_threads = threads
    if low_memory:
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
        unmap_freed_activations()
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"onnxruntime cannot load {path}: {reason} (is the model file, and its .data file "
            "beside it, complete?)"
        ) from None


def unmap_freed_activations() -> None:
    """Linux, glibc: blocks of 1 MiB and more (activations, without the arena) get their own
    mapping, unmapped when freed. glibc would otherwise raise this threshold to the largest
    block freed and keep later activations in its heap (0.14 GiB more peak for
    coatnet_rmlp_2_rw_384 at batch 4). It applies to the whole process, from here on."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 2**20)


class OrtModel:
    """A model in an onnxruntime CPU session."""

    name = "onnxruntime"

    def __init__(self, path: Path, options: RunOptions) -> None:
        self.session = make_session(path, options.threads, options.low_memory, options.unfused)
        self.input_name = self.session.get_inputs()[0].name
        last = (self.session.get_outputs()[0].shape or [None])[-1]
        self.classes: int | None = last if isinstance(last, int) else None

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]
