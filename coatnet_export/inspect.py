"""Describe an ONNX model on disk: its coatnet-export metadata, inputs, outputs and files."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx

from coatnet_export.errors import InputError
from coatnet_export.export.package import data_file
from coatnet_export.metadata import ExportMetadata

MODEL_FILE = "model.onnx"


def resolve_model_path(path: Path, name: str = MODEL_FILE) -> Path:
    """``path`` itself if it is a file, ``path/<name>`` if it is an export directory."""
    candidate = path / name if path.is_dir() else path
    if not candidate.is_file():
        where = f"{path} holds no {name}" if path.is_dir() else f"{path} does not exist"
        raise InputError(f"{where} (give an export directory or an .onnx file)")
    return candidate


def load_proto(path: Path) -> onnx.ModelProto:
    """The graph of an ONNX file without its weights."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError family
        raise InputError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None


def metadata_of(proto: onnx.ModelProto) -> ExportMetadata | None:
    """The coatnet-export metadata of a model, or None if it has none."""
    try:
        return ExportMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    except (ValueError, TypeError, KeyError):
        return None


def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims]


def describe(path: Path) -> dict[str, Any]:
    """A flat description of an export, for ``coatnet-export info``."""
    model_path = resolve_model_path(path)
    proto = load_proto(model_path)
    files = {model_path.name: model_path.stat().st_size}
    if data_file(model_path).exists():
        files[data_file(model_path).name] = data_file(model_path).stat().st_size
    ops = Counter(n.op_type for n in proto.graph.node)
    description: dict[str, Any] = {
        "path": str(model_path),
        "files": files,
        "opset": max(
            (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0
        ),
        "inputs": {i.name: _shape(i) for i in proto.graph.input},
        "outputs": {o.name: _shape(o) for o in proto.graph.output},
        "nodes": len(proto.graph.node),
        "top_ops": dict(ops.most_common(8)),
    }
    metadata = metadata_of(proto)
    if metadata is None:
        description["metadata"] = "none (not made by coatnet-export)"
    else:
        description.update({k: v for k, v in asdict(metadata).items() if v not in (None, {})})
    return description
