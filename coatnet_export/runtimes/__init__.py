"""Runtimes that run an exported model: one small interface, one module per runtime.

``load_model(path, runtime, RunOptions(threads=2))`` returns a :class:`LoadedModel` whose
``run(batch)`` gives the logits, checked for their shape (one row per input row, the model's
classes) before anyone computes a figure from them: a runtime that ran out of memory may
return fewer rows without saying so. validate, bench, the quantize report and predict all run
models through it, so every runtime meets the same parity gates. Optional runtimes import
their library only when asked for: OpenVINO (``pip install 'coatnet-export[openvino]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from coatnet_export.errors import InputError

if TYPE_CHECKING:
    import numpy as np

RUNTIMES = ("onnxruntime", "openvino")
"""Runtime names accepted by ``--runtime``."""
LOW_MEMORY_BYTES = 2**30
"""fp32 weights from this size on run in low-memory onnxruntime sessions (weights held once:
pre-packing would add a copy of every matrix, 2.3 -> 2.7-3.0 GiB peak for coatnet_4)."""


@dataclass(frozen=True)
class RunOptions:
    """How a runtime should run a model."""

    threads: int | None = None
    """Intra-op threads (None: the runtime's default, all cores)."""
    low_memory: bool = False
    """Hold the weights once: no pre-packing, no arena (large models; onnxruntime only)."""
    unfused: bool = False
    """Run the graph as written, without fusing (onnxruntime only): a QDQ model's products are
    dequantized and summed in float, the integer arithmetic without saturation that CPUs whose
    int8 kernels do not saturate compute (quantize/presets.judge)."""
    precision: str = "f32"
    """Inference precision where a runtime may choose (OpenVINO: f32 or bf16; onnxruntime
    runs the model's own types and takes only f32)."""


class LoadedModel(Protocol):
    """A model ready to run: ``run`` takes one input batch and returns the first output."""

    name: str
    """The runtime's name, e.g. ``onnxruntime``."""
    input_name: str
    classes: int | None
    """The width of the output's last axis, where the model fixes it."""

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def check_runtime(runtime: str, precision: str = "f32") -> None:
    """Fail early, before any heavy work, when ``runtime`` is unknown or not installed, or
    cannot run in ``precision``."""
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r} (choose one of {', '.join(RUNTIMES)})")
    if runtime == "onnxruntime" and precision != "f32":
        raise InputError(
            f"onnxruntime runs a model in its own precision: --precision {precision} needs "
            "--runtime openvino"
        )
    if runtime == "openvino":
        from coatnet_export.runtimes.openvino import import_openvino

        import_openvino()


def load_model(
    path: Path, runtime: str = "onnxruntime", options: RunOptions | None = None
) -> LoadedModel:
    """Load ``path`` into the named runtime."""
    options = options or RunOptions()
    check_runtime(runtime, options.precision)
    if options.unfused and runtime != "onnxruntime":
        raise ValueError("only onnxruntime runs a graph unfused")
    if runtime == "openvino":
        from coatnet_export.runtimes.openvino import OpenVinoModel

        return CheckedModel(OpenVinoModel(path, options), path)
    from coatnet_export.runtimes.onnxruntime import OrtModel

    return CheckedModel(OrtModel(path, options), path)


class CheckedModel:
    """A loaded model whose every result is checked by :func:`check_logits`; otherwise the
    model itself (its attributes are the wrapped model's)."""

    def __init__(self, model: LoadedModel, path: Path) -> None:
        self.model = model
        self.path = path
        self.name: str = model.name
        self.input_name: str = model.input_name
        self.classes: int | None = model.classes

    def __getattr__(self, name: str) -> object:
        return getattr(self.model, name)

    def run(self, batch: np.ndarray) -> np.ndarray:
        result = self.model.run(batch)
        check_logits(result, len(batch), self.model.classes, self.model.name, self.path)
        return result


def check_logits(
    result: np.ndarray, rows: int, classes: int | None, runtime: str, path: Path
) -> None:
    """InputError unless ``result`` holds ``rows`` rows of ``classes`` logits (any width when
    None): a runtime short of memory has returned fewer rows, or none, without an error."""
    shape = tuple(getattr(result, "shape", ()))
    if len(shape) == 2 and shape[0] == rows and classes in (None, shape[1]):
        return
    expected = f"{rows} x {classes if classes is not None else 'classes'}"
    raise InputError(
        f"{runtime} returned logits of shape {shape} for a batch of {rows} from {path} "
        f"(expected {expected}): it failed without an error, likely short of memory (use a "
        "smaller --batch, or free memory)"
    )
