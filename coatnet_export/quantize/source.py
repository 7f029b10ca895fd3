"""The fp32 model to quantize, checked before any heavy work, and the inputs quantization runs
on: calibration images (or random inputs) and held-out inputs for the gate."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from coatnet_export.bench import INT8_OPS
from coatnet_export.describe import load_proto, metadata_of, resolve_model_path
from coatnet_export.errors import InputError
from coatnet_export.metadata import ExportMetadata
from coatnet_export.preprocess import Preprocessing
from coatnet_export.quantize.calibrate import Inputs, SessionPlan, image_inputs, model_batch
from coatnet_export.quantize.options import QuantOptions
from coatnet_export.runtimes import LOW_MEMORY_BYTES

RANDOM_EVAL_SAMPLES = 32
EVAL_BATCH = 8
"""Held-out inputs per run of a plain (not augmented) model."""


@dataclass(frozen=True)
class Sessions:
    """How a quantization's sessions run the model."""

    one: SessionPlan
    """One input per run (large models, augmented models for calibration and SQNR)."""
    batched: SessionPlan
    """Held-out inputs in batches, in the runtime the int8 model is for."""


@dataclass(frozen=True)
class Source:
    """The fp32 model to quantize, checked."""

    model_path: Path
    metadata: ExportMetadata | None
    preprocessing: Preprocessing
    weight_bytes: int
    fixed_batch: int | None

    @property
    def folder(self) -> Path:
        return self.model_path.parent

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.preprocessing.channels, *self.preprocessing.size)

    def plan(self, threads: int | None, batch: int = 1) -> SessionPlan:
        """How onnxruntime sessions run this model: batches of ``batch`` (or the model's fixed
        batch); large weights in low-memory sessions, one input at a time."""
        large = self.weight_bytes >= LOW_MEMORY_BYTES
        return SessionPlan(
            threads,
            large,
            self.fixed_batch or (1 if large else batch),
            self.fixed_batch is not None,
        )

    def sessions(self, threads: int | None, runtime: str) -> Sessions:
        batched = replace(self.plan(threads, EVAL_BATCH), runtime=runtime)
        return Sessions(self.plan(threads), batched)


@dataclass(frozen=True)
class Data:
    """The inputs quantization runs on."""

    calibration: Inputs | None
    evaluation: Inputs
    calibration_source: str
    notes: list[str] = field(default_factory=list)


def check_source(target: Path, preprocessing: Preprocessing | None) -> Source:
    """The fp32 model at ``target``, refused before any heavy work if it cannot be quantized."""
    model_path = resolve_model_path(target)
    proto = load_proto(model_path)  # whole, one input, external data present and complete
    if any(n.op_type in INT8_OPS or n.op_type == "DequantizeLinear" for n in proto.graph.node):
        raise InputError(f"{model_path} is already quantized; quantize the fp32 model.onnx")
    metadata = metadata_of(proto, model_path)
    if preprocessing is None:
        if metadata is None:
            raise InputError(
                f"{model_path} has no coatnet-export metadata, so its preprocessing "
                "is unknown: pass --img-size H W, --mean and --std"
            )
        preprocessing = metadata.preprocessing()
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    wanted = (preprocessing.channels, *preprocessing.size)
    fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(fixed) != 4 or any(
        f is not None and f != w for f, w in zip(fixed[1:], wanted, strict=False)
    ):
        raise InputError(
            f"{model_path} takes input {fixed}, but the preprocessing gives {list(wanted)} per "
            "image (check --img-size and the number of --mean/--std values)"
        )
    weights = sum(tensor_bytes(t) for t in proto.graph.initializer)
    return Source(model_path, metadata, preprocessing, weights, model_batch(proto))


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes of an initializer's data, inline or external."""
    if uses_external_data(tensor):
        return int({e.key: e.value for e in tensor.external_data}.get("length", 0))
    count = 1
    for d in tensor.dims:
        count *= d
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def gather_data(source: Source, opts: QuantOptions) -> Data:
    """The calibration and held-out inputs (images are decoded once to check them, then only
    their paths are kept)."""
    notes: list[str] = []
    calibration, described = calibration_inputs(source, opts, notes)
    evaluation = held_out_inputs(source, opts, calibration)
    if not len(evaluation):
        evaluation = Inputs(source.preprocessing, random=RANDOM_EVAL_SAMPLES, seed=opts.seed + 1)
        notes.append(
            "no held-out images (give --eval-data DIR): agreement measured on random inputs"
        )
    return Data(calibration, evaluation, described, notes)


def calibration_inputs(
    source: Source, opts: QuantOptions, notes: list[str]
) -> tuple[Inputs | None, str]:
    """The calibration inputs (None for dynamic quantization) and how to describe them."""
    if opts.mode != "static":
        return None, "none (dynamic quantization)"
    if opts.calibration_data is None:
        notes.append(
            "calibrated on random inputs: activation ranges of noise, not of "
            "images, usually cost accuracy; use --calibration-data"
        )
        random = Inputs(source.preprocessing, random=opts.samples, seed=opts.seed)
        return random, f"{opts.samples} random inputs"
    labels = source.metadata.labels if source.metadata else None
    calibration, bad = image_inputs(
        opts.calibration_data, source.preprocessing, labels, opts.samples
    )
    if bad:
        notes.append(f"skipped {bad} unreadable calibration file(s)")
    if not len(calibration):
        raise InputError(
            f"no usable image in {opts.calibration_data}"
            + (f" ({bad} unreadable file(s))" if bad else "")
        )
    return calibration, f"{len(calibration)} images from {opts.calibration_data}"


def held_out_inputs(source: Source, opts: QuantOptions, calibration: Inputs | None) -> Inputs:
    """``--eval-data``'s images, else the calibration folder's unused ones (maybe none)."""
    labels = source.metadata.labels if source.metadata else None
    if opts.eval_data is not None:
        held_out, _ = image_inputs(
            opts.eval_data, source.preprocessing, labels, opts.eval_samples, option="--eval-data"
        )
        return held_out
    if opts.calibration_data is not None:
        used = set(calibration.paths) if calibration else set()
        held_out, _ = image_inputs(
            opts.calibration_data, source.preprocessing, labels, opts.eval_samples, used
        )
        return held_out
    return Inputs(source.preprocessing)
