"""Make an exported ONNX file deployable: one file or one external-data file, metadata, checks."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx
from onnx.external_data_helper import uses_external_data

from coatnet_export.errors import InputError
from coatnet_export.export.gathers import gather_in_final_shape
from coatnet_export.layout import data_file
from coatnet_export.metadata import ExportMetadata, write_props

EXTERNAL_DATA_THRESHOLD = 1_900_000_000
"""Weights above this many bytes go to an external data file: protobuf stops at 2 GiB."""

GATHER_OPS = ("Gather", "GatherND", "GatherElements")

GRAPH_FIELD = 7  # ModelProto.graph
INITIALIZER_FIELD = 5  # GraphProto.initializer
RAW_DATA_FIELD = 9  # TensorProto.raw_data
COPY_CHUNK = 64 * 2**20
"""Bytes copied at a time when weights are streamed from the data file into the model file."""


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
    weight_bytes: int
    """Bytes of the initializers, wherever they are stored."""


def package_model(
    path: Path, metadata: ExportMetadata, threshold: int = EXTERNAL_DATA_THRESHOLD
) -> GraphSummary:
    """Rewrite ``path`` in place with ``metadata`` and its lookups gathering in their final
    shape (:mod:`~coatnet_export.export.gathers`), check it, and store its weights by size.

    Weights above ``threshold`` bytes live in one ``<name>.data`` file referenced relatively,
    so the pair can be moved together; smaller models become one self-contained file,
    whatever the exporter wrote, streamed from the data file (:func:`write_self_contained`).
    The checks run before weights are brought into the graph, so they never hold a second
    copy. Raises if the ONNX checker or shape inference fails.
    """
    model = onnx.load(str(path), load_external_data=False)
    weight_bytes = sum(_tensor_bytes(t) for t in model.graph.initializer)
    exported_data = {
        _external_info(t)["location"] for t in model.graph.initializer if uses_external_data(t)
    }
    want_external = weight_bytes > threshold
    target = data_file(path)
    gather_in_final_shape(model)
    write_props(model, metadata)
    onnx.save_model(model, str(path))  # the graph; the weights stay where the exporter put them
    summary = check_model(path)
    if exported_data == ({target.name} if want_external else set()):
        return summary
    if not want_external and _only_initializers_external(model):
        write_self_contained(model, path.parent, path)
        for location in exported_data:
            (path.parent / location).unlink()
        summary.external_data, summary.files = False, [path.name]
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


def write_self_contained(model: onnx.ModelProto, base_dir: Path, path: Path) -> None:
    """Write ``model``, whose initializers keep their bytes in external files under
    ``base_dir``, as one self-contained file at ``path``, without holding the weights.

    Protobuf merges repeated serializations of a message, and its fields may come in any
    order: so the file is the model without its graph, then the graph field, made of the graph
    without its initializers and each initializer as its description followed by its
    ``raw_data`` field, whose bytes are copied from the data file in chunks. The model is
    written to a temporary name beside ``path`` and renamed; ``model`` itself is not changed.
    """
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    tensors = [_split_tensor(t) for t in graph.initializer]
    graph.ClearField("initializer")
    graph_head = graph.SerializeToString()
    shell = onnx.ModelProto()
    shell.CopyFrom(model)
    shell.ClearField("graph")
    sizes = [len(head) + (_field_size(data[2]) if data else 0) for head, data in tensors]
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(shell.SerializeToString())
            out.write(_key(GRAPH_FIELD) + _varint(len(graph_head) + sum(map(_field_size, sizes))))
            out.write(graph_head)
            for (head, data), size in zip(tensors, sizes, strict=True):
                out.write(_key(INITIALIZER_FIELD) + _varint(size) + head)
                if data:
                    location, offset, length = data
                    out.write(_key(RAW_DATA_FIELD) + _varint(length))
                    _copy_range(base_dir / location, offset, length, out)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _only_initializers_external(model: onnx.ModelProto) -> bool:
    """Whether the initializers are the only tensors stored outside the model (what
    :func:`write_self_contained` handles); others need onnx's loader."""
    if any(uses_external_data(t) for t in model.graph.sparse_initializer):
        return False
    return not any(uses_external_data(t) for t in _attribute_tensors(model.graph))


def _attribute_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Tensors held by node attributes (Constant values), subgraphs included."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            for subgraph in [*subgraphs, *attribute.graphs]:
                yield from subgraph.initializer
                yield from _attribute_tensors(subgraph)


def _split_tensor(tensor: onnx.TensorProto) -> tuple[bytes, tuple[str, int, int] | None]:
    """A tensor's fields without its data, and where its data is (file, offset, length); a
    tensor stored inside the model is all fields, with no data to copy."""
    if not uses_external_data(tensor):
        return tensor.SerializeToString(), None
    info = _external_info(tensor)
    head = onnx.TensorProto()
    head.CopyFrom(tensor)
    for name in ("external_data", "data_location", "raw_data"):
        head.ClearField(name)
    return head.SerializeToString(), (
        info["location"],
        int(info.get("offset", 0)),
        int(info["length"]),
    )


def _copy_range(source: Path, offset: int, length: int, out: BinaryIO) -> None:
    """Copy ``length`` bytes of ``source`` from ``offset`` to ``out``, a chunk at a time."""
    with open(source, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, COPY_CHUNK))
            if not chunk:
                raise InputError(f"{source} ends {left} bytes before the weights it should hold")
            out.write(chunk)
            left -= len(chunk)


def _key(field: int) -> bytes:
    """The key of a length-delimited protobuf field."""
    return _varint(field << 3 | 2)


def _field_size(payload: int) -> int:
    """Bytes of a length-delimited field (number below 16: one key byte) with this payload."""
    return 1 + len(_varint(payload)) + payload


def _varint(value: int) -> bytes:
    """Protobuf's base-128 encoding of a non-negative integer."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


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
        weight_bytes=sum(_tensor_bytes(t) for t in graph.initializer),
    )
