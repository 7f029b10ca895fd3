"""The OpenVINO CPU runtime (opt-in: ``pip install 'coatnet-export[openvino]'``).

OpenVINO reads our ONNX files as they are (fp32, QDQ int8, external data) and runs a dynamic
batch axis without reshaping. The precision is f32 unless bf16 is asked for: left to itself,
OpenVINO picks bf16 on CPUs that have it, about 5e-3 off (and slower on issue 11's Xeon).
e2e models are refused: the CPU plugin computes their preprocessing (Pillow's resampling, in
doubles) in single precision.
int8 models run on one thread on x86 CPUs without VNNI (:func:`int8_threads`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coatnet_export.console import warn_once
from coatnet_export.errors import InputError
from coatnet_export.runtimes import RunOptions

if TYPE_CHECKING:
    import numpy as np

PRECISIONS = ("f32", "bf16")
"""Inference precisions ``--precision`` accepts."""
INSTALL = "pip install 'coatnet-export[openvino]'"


def import_openvino() -> Any:
    """The ``openvino`` module, or an InputError saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise InputError(f"OpenVINO is not installed ({INSTALL})") from None
    return openvino


@functools.cache
def core() -> Any:
    """One ``openvino.Core`` per process (it holds the loaded device plugins)."""
    return import_openvino().Core()


def reason(exc: Exception) -> str:
    """The telling line of an OpenVINO error (its first lines name C++ source files)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from", "Check "))]
    return (useful or lines or [type(exc).__name__])[-1]


def compile_config(options: RunOptions) -> dict[str, object]:
    """CPU plugin settings: the precision, latency mode (one stream) and the thread count."""
    if options.precision not in PRECISIONS:
        raise InputError(
            f"OpenVINO precision {options.precision!r} is not supported (choose one of "
            f"{', '.join(PRECISIONS)})"
        )
    config: dict[str, object] = {
        "INFERENCE_PRECISION_HINT": options.precision,
        "PERFORMANCE_HINT": "LATENCY",
    }
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = options.threads
    return config


def int8_threads(model: Any, threads: int | None) -> int | None:
    """The threads an int8 (QDQ) model may use: one on x86 without VNNI, where OpenVINO
    2026.4.1's int8 kernels split across threads give results that depend on the batch and
    change from run to run (the digits fixture, two threads, AVX2 emulated by qemu: up to
    5.4 % of max |logit| at batch 2, none at batch 1 or on one thread; AMD EPYC without
    AVX-512 reported the same 5 %); onnxruntime is also the faster int8 runtime there."""
    from coatnet_export.quantize.presets import preset_for, read_cpu

    quantized = any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
    if not quantized or threads == 1 or not preset_for(read_cpu()).saturates:
        return threads
    warn_once(
        "OpenVINO runs int8 models on one thread on this CPU (x86 without VNNI): with more, "
        "its int8 kernels give batch-dependent results here; onnxruntime is the faster int8 "
        "runtime on this CPU class"
    )
    return 1


def check_input(path: Path, model: Any) -> None:
    """One float input; e2e models (uint8 pixels in) are refused with the reason."""
    if len(model.inputs) != 1:
        raise InputError(f"{path} has {len(model.inputs)} inputs; a classifier takes exactly one")
    if model.inputs[0].get_element_type().get_type_name() == "u8":
        raise InputError(
            f"OpenVINO cannot run the e2e model {path}: its CPU plugin computes the graph's "
            "preprocessing (Pillow's resampling, in doubles) in single precision, so the pixels "
            "differ from Pillow's (run it with --runtime onnxruntime, or run model.onnx in "
            "OpenVINO)"
        )


class OpenVinoModel:
    """A model compiled for OpenVINO's CPU plugin, batch axis as the file has it.

    Not reshaped per batch size: a static batch took 4 % (fp32) to 12 % (int8) less CPU time
    (coatnet_0, batch 1, one thread of an AMD EPYC), but OpenVINO 2026.4.1 computed wrong
    int8 logits for some static batches (the digits fixture at batch 4, 6 and 8: cosine
    similarity 0.58-0.68 with onnxruntime's, against 0.9995 with the dynamic batch).
    """

    name = "openvino"

    def __init__(self, path: Path, options: RunOptions) -> None:
        config = compile_config(options)
        try:
            model = core().read_model(str(path))
        except RuntimeError as exc:
            raise InputError(
                f"OpenVINO cannot read {path}: {reason(exc)} (is the model file, and its .data "
                "file beside it, complete?)"
            ) from None
        check_input(path, model)
        threads = int8_threads(model, options.threads)
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.input_name: str = model.inputs[0].get_any_name()
        shape = model.outputs[0].get_partial_shape()
        dims = list(shape) if shape.rank.is_static else []
        self.classes: int | None = dims[-1].get_length() if dims and dims[-1].is_static else None
        try:
            compiled = core().compile_model(model, "CPU", config)
        except RuntimeError as exc:
            raise InputError(f"OpenVINO cannot compile {path}: {reason(exc)}") from None
        self.precision: str = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        """The precision the plugin runs in (``f32`` or ``bf16``)."""
        self.request = compiled.create_infer_request()

    def run(self, batch: np.ndarray) -> np.ndarray:
        # The result array is the request's own buffer, overwritten by the next call: copy it.
        return self.request.infer({0: batch}, share_inputs=True)[0].copy()
