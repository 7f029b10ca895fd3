"""The triton target: a Triton Inference Server model repository (ONNX Runtime backend).

``--output REPO`` receives ``REPO/<name>/config.pbtxt``, ``REPO/<name>/1/model.onnx`` (with the
external data file it references, if any) and ``REPO/<name>/labels.txt``. The configuration is
built as Triton's own ``inference.ModelConfig`` message (the ``model_config_pb2`` module that
ships in ``tritonclient``) and written with protobuf's text format, so it cannot hold a field
Triton does not know. Inputs and outputs (names, types, dims) come from the ONNX graph.

A dynamic-batch export gets ``max_batch_size`` and dynamic batching, with dims that leave out
the batch axis; a fixed-batch export gets ``max_batch_size: 0`` and its full shape (Triton
batches nothing for it).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from google.protobuf import text_format
from onnx import TensorProto
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from coatnet_export.describe import load_proto
from coatnet_export.errors import InputError
from coatnet_export.layout import INT8_FILE, MODEL_FILE
from coatnet_export.limits import check_int32
from coatnet_export.metadata import ExportMetadata
from coatnet_export.output import check_member_name, claim, publish, staging
from coatnet_export.targets import (
    PackageOptions,
    PackageOutcome,
    export_metadata,
    int8_layout_notes,
)

PLATFORM = "onnxruntime_onnx"
LABELS_FILE = "labels.txt"
DEFAULT_MAX_BATCH = 8
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
TRITON_TYPES = {
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.BFLOAT16: "TYPE_BF16",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.UINT16: "TYPE_UINT16",
    TensorProto.UINT32: "TYPE_UINT32",
    TensorProto.UINT64: "TYPE_UINT64",
    TensorProto.BOOL: "TYPE_BOOL",
    TensorProto.STRING: "TYPE_STRING",
}
"""ONNX element types and Triton's names for them (``inference.DataType``)."""
SERVER_IMAGE = "nvcr.io/nvidia/tritonserver:26.04-py3"


@dataclass(frozen=True)
class TritonOptions:
    """How the model is to be served."""

    name: str | None = None
    int8: bool = False
    instances: int = 1
    threads: int | None = None
    max_batch_size: int | None = None
    openvino: bool = False


@dataclass(frozen=True)
class Tensor:
    """A graph input or output: its name, Triton type and full shape (None: a dynamic axis)."""

    name: str
    data_type: str
    shape: tuple[int | None, ...]


def model_config_pb2() -> Any:
    """Triton's ModelConfig schema; InputError if tritonclient is not installed."""
    try:
        from tritonclient.grpc import model_config_pb2 as schema
    except (ImportError, RuntimeError):  # tritonclient.grpc raises RuntimeError without grpc
        raise InputError(
            "--target triton builds the config with Triton's own schema, from tritonclient: "
            "pip install -c constraints.txt -e '.[triton]'"
        ) from None
    return schema


def graph_tensors(values: Any) -> list[Tensor]:
    """The inputs or outputs of a graph as :class:`Tensor`; InputError for types Triton lacks."""
    tensors = []
    for value in values:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in TRITON_TYPES:
            raise InputError(
                f"tensor {value.name} has ONNX type "
                f"{TensorProto.DataType.Name(tensor_type.elem_type)}, which Triton cannot serve"
            )
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
        )
        tensors.append(Tensor(value.name, TRITON_TYPES[tensor_type.elem_type], shape))
    return tensors


def batching(inputs: list[Tensor], requested: int | None) -> int:
    """``max_batch_size``: the requested (or default) size for a dynamic batch axis, else 0."""
    dynamic = [t.shape[:1] == (None,) for t in inputs]
    if any(t.shape[1:].count(None) for t in inputs):
        raise InputError("the model has a dynamic axis besides the batch; Triton needs the dims")
    if all(dynamic):
        return requested or DEFAULT_MAX_BATCH
    if requested:
        raise InputError(
            f"the model's batch is fixed at {inputs[0].shape[0]}, so Triton cannot batch "
            "requests for it (drop --max-batch-size, or export with --batch dynamic)"
        )
    return 0


def build_config(
    name: str, inputs: list[Tensor], outputs: list[Tensor], options: TritonOptions
) -> Any:
    """The ``inference.ModelConfig`` message for the model."""
    schema = model_config_pb2()
    max_batch = batching(inputs, options.max_batch_size)
    skip = 1 if max_batch else 0
    config = schema.ModelConfig(name=name, platform=PLATFORM, max_batch_size=max_batch)
    for tensor in inputs:
        entry = config.input.add(
            name=tensor.name, data_type=schema.DataType.Value(tensor.data_type)
        )
        entry.dims.extend(tensor.shape[skip:])
        if len(tensor.shape) - skip == 3:
            entry.format = schema.ModelInput.FORMAT_NCHW
    for index, tensor in enumerate(outputs):
        entry = config.output.add(
            name=tensor.name, data_type=schema.DataType.Value(tensor.data_type)
        )
        entry.dims.extend(tensor.shape[skip:])
        if index == 0:
            entry.label_filename = LABELS_FILE
    if max_batch:
        config.dynamic_batching.SetInParent()
    config.instance_group.add(count=options.instances, kind=schema.ModelInstanceGroup.KIND_CPU)
    if options.threads:
        config.parameters["intra_op_thread_count"].string_value = str(options.threads)
    if options.openvino:
        accelerators = config.optimization.execution_accelerators.cpu_execution_accelerator
        accelerators.add(name="openvino")
    return config


def external_files(proto: onnx.ModelProto) -> list[str]:
    """The external data files the model's initializers reference (relative names)."""
    names = {
        ExternalDataInfo(tensor).location
        for tensor in proto.graph.initializer
        if uses_external_data(tensor)
    }
    return sorted(names)


def model_name(requested: str | None, metadata: ExportMetadata, int8: bool) -> str:
    """The model's folder in the repository: one plain name (``--name`` cannot leave it)."""
    name = check_member_name(
        metadata.variant + ("_int8" if int8 else "") if requested is None else requested, "--name"
    )
    if not NAME_PATTERN.match(name):
        raise InputError(
            f"model name {name!r} must use letters, digits, '_', '-' and '.' only (--name)"
        )
    return name


def write_repository(export_dir: Path, output: Path, options: TritonOptions, force: bool) -> Path:
    """Write the model repository to ``output`` (staged, then renamed); the model's folder."""
    metadata = export_metadata(export_dir)
    source = export_dir / (INT8_FILE if options.int8 else MODEL_FILE)
    if not source.is_file():
        raise InputError(
            f"{export_dir} holds no {source.name} (run `coatnet-export quantize {export_dir}` "
            "first, or drop --int8)"
        )
    proto = load_proto(source)
    name = model_name(options.name, metadata, options.int8)
    inputs, outputs = graph_tensors(proto.graph.input), graph_tensors(proto.graph.output)
    config = build_config(name, inputs, outputs, options)
    classes = outputs[0].shape[-1] or metadata.num_classes
    labels = metadata.labels if metadata.labels and len(metadata.labels) == classes else None
    with claim(output, force, [export_dir]) as claimed, staging(claimed) as stage:
        version = stage / name / "1"
        version.mkdir(parents=True)
        shutil.copyfile(source, version / MODEL_FILE)
        for data in external_files(proto):
            shutil.copyfile(export_dir / data, version / data)
        lines = labels or [str(i) for i in range(classes)]
        (stage / name / LABELS_FILE).write_text("".join(f"{line}\n" for line in lines))
        (stage / name / "config.pbtxt").write_text(text_format.MessageToString(config))
        publish(stage, output)
    return output / name


def memory_notes(metadata: ExportMetadata, config: Any, instances: int) -> list[str]:
    """A note when ``instances`` copies of the model, each running its largest batch, need
    more memory than this machine has (the server may be another machine: not an error)."""
    from coatnet_export.sources.model_source import ModelSpec
    from coatnet_export.sources.resources import available_memory, estimate_memory, format_bytes
    from models import VariantSpec

    try:
        architecture = VariantSpec.from_dict(metadata.architecture)
    except (KeyError, TypeError, ValueError):
        return []
    spec = ModelSpec(
        architecture,
        (metadata.img_size[0], metadata.img_size[1]),
        metadata.in_channels,
        metadata.num_classes,
    )
    batch = config.max_batch_size or int(metadata.batch)
    needed = instances * estimate_memory(spec, batch, batch).total
    available = available_memory()
    if available is None or needed <= available:
        return []
    return [
        f"{instances} instance(s) at batch {batch} need at least {format_bytes(needed)} of "
        f"memory, more than the {format_bytes(available)} available here: give the server "
        "that much, or lower --instances or --max-batch-size"
    ]


def summary_rows(config: Any) -> list[dict[str, Any]]:
    """One row per input and output: what Triton will be told."""
    schema = model_config_pb2()
    return [
        {
            "tensor": tensor.name,
            "kind": kind,
            "type": schema.DataType.Name(tensor.data_type),
            "dims": list(tensor.dims),
        }
        for kind, tensors in (("input", config.input), ("output", config.output))
        for tensor in tensors
    ]


def build(request: PackageOptions) -> PackageOutcome:
    """``coatnet-export package DIR --target triton --output REPO``: :func:`write_repository`."""
    if request.output is None:
        raise InputError("--target triton writes a model repository: give --output REPO")
    given = request.options
    options = TritonOptions(
        name=given.get("name"),
        int8=bool(given.get("int8")),
        instances=check_int32(given.get("instances") or 1, "--instances", "Triton's count"),
        threads=given.get("threads"),
        max_batch_size=given.get("max_batch_size"),
        openvino=bool(given.get("openvino")),
    )
    if options.max_batch_size is not None:
        check_int32(options.max_batch_size, "--max-batch-size", "Triton's max_batch_size")
    folder = write_repository(request.export_dir, request.output, options, request.force)
    config = text_format.Parse(
        (folder / "config.pbtxt").read_text(), model_config_pb2().ModelConfig()
    )
    notes = [
        f"max_batch_size {config.max_batch_size}, {options.instances} CPU instance(s)"
        + (", dynamic batching" if config.max_batch_size else ", fixed batch: no batching"),
        "serve it (Docker, x86-64): docker run --rm -p8000:8000 -p8001:8001 -p8002:8002 "
        f"-v {request.output.resolve()}:/models {SERVER_IMAGE} "
        "tritonserver --model-repository=/models",
    ]
    notes += memory_notes(export_metadata(request.export_dir), config, options.instances)
    if options.int8:
        runtime = "openvino" if options.openvino else "onnxruntime"
        notes += int8_layout_notes(request.export_dir, runtime)
    return PackageOutcome(files=[folder], table=summary_rows(config), notes=notes)
