"""Make an exported ONNX file deployable: one file or one external-data file, metadata, checks."""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from coatnet_export.errors import InputError
from coatnet_export.metadata import ExportMetadata, write_props

EXTERNAL_DATA_THRESHOLD = 1_900_000_000
"""Weights above this many bytes go to an external data file: protobuf stops at 2 GiB."""

GATHER_OPS = ("Gather", "GatherND", "GatherElements")


@dataclass
class GraphSummary:
    """What the packaged graph holds."""

    nodes: int
    op_counts: dict[str, int]
    table_lookups: int
    """Gather-family nodes that read from a constant (a bias table lookup left in the graph)."""
    output_shape: list[int | str]
    external_data: bool
    files: list[str]


def data_file(model_path: Path) -> Path:
    """Where a model's external weights live: ``model.onnx.data`` beside ``model.onnx``."""
    return model_path.with_name(model_path.name + ".data")


def package_model(
    path: Path, metadata: ExportMetadata, threshold: int = EXTERNAL_DATA_THRESHOLD
) -> GraphSummary:
    """Rewrite ``path`` in place with ``metadata``, check it, and store its weights by size.

    Weights above ``threshold`` bytes live in one ``<name>.data`` file referenced relatively,
    so the pair can be moved together; smaller models become one self-contained file,
    whatever the exporter wrote. The checks run before weights are brought into the graph, so
    they never hold a second copy. Raises if the ONNX checker or shape inference fails.
    """
    model = onnx.load(str(path), load_external_data=False)
    weight_bytes = sum(_tensor_bytes(t) for t in model.graph.initializer)
    exported_data = {
        _external_info(t)["location"] for t in model.graph.initializer if uses_external_data(t)
    }
    want_external = weight_bytes > threshold
    target = data_file(path)
    write_props(model, metadata)
    onnx.save_model(model, str(path))  # the graph; the weights stay where the exporter put them
    summary = check_model(path)
    if exported_data == ({target.name} if want_external else set()):
        return summary
    model = onnx.load(str(path), load_external_data=True)
    for location in exported_data:
        (path.parent / location).unlink()
    if want_external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=target.name,
            size_threshold=1024,
            convert_attribute=False,
        )
    else:
        onnx.save_model(model, str(path))
    summary.external_data = want_external
    summary.files = [path.name] + ([target.name] if want_external else [])
    return summary


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if uses_external_data(tensor):
        return int(_external_info(tensor).get("length", 0))
    count = 1
    for d in tensor.dims:
        count *= d
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def check_model(path: Path) -> GraphSummary:
    """Full ONNX check and strict shape inference of a model on disk, and what its graph holds."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise InputError(f"{path} fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        inferred_path = Path(tmp) / path.name
        onnx.shape_inference.infer_shapes_path(
            str(path), str(inferred_path), check_type=True, strict_mode=True, data_prop=True
        )
        inferred = onnx.load(str(inferred_path), load_external_data=False)
    graph = inferred.graph
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    lookups = sum(1 for n in graph.node if n.op_type in GATHER_OPS and n.input[0] in constants)
    dims = graph.output[0].type.tensor_type.shape.dim
    shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims]
    external = any(uses_external_data(t) for t in graph.initializer)
    files = [path.name] + ([data_file(path).name] if external else [])
    return GraphSummary(
        nodes=len(graph.node),
        op_counts=dict(Counter(n.op_type for n in graph.node)),
        table_lookups=lookups,
        output_shape=shape,
        external_data=external,
        files=files,
    )
