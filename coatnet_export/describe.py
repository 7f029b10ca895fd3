"""Describe an ONNX model on disk: its coatnet-export metadata, inputs, outputs and files."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import uses_external_data

from coatnet_export.errors import InputError, os_error_message
from coatnet_export.layout import (
    INT8_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    QUANTIZATION_FILE,
    VALIDATION_FILE,
    data_file,
    data_name,
)
from coatnet_export.metadata import PRODUCER, ExportMetadata
from coatnet_export.preprocess import CROP_MODES, INTERPOLATIONS


def resolve_model_path(path: Path, name: str = MODEL_FILE) -> Path:
    """``path`` itself if it is a file, ``path/<name>`` if it is an export directory."""
    candidate = path / name if path.is_dir() else path
    if not candidate.is_file():
        where = f"{path} holds no {name}" if path.is_dir() else f"{path} does not exist"
        raise InputError(f"{where} (give an export directory or an .onnx file)")
    return candidate


def load_proto(path: Path) -> onnx.ModelProto:
    """The graph of an ONNX file without its weights, checked to be whole and single-input.

    An empty or undecodable file, external weights that are missing, truncated or outside
    the model's folder, and a graph with other than one input are :class:`InputError`.
    """
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except OSError as exc:
        raise InputError(os_error_message(exc, path, "reading")) from None
    except Exception as exc:  # protobuf raises its own DecodeError family
        raise InputError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: truncated, damaged or "
            "not ONNX)"
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise InputError(f"{path} is empty or not an ONNX model (it holds no graph)")
    check_external_data(path, proto)
    check_single_input(path, proto)
    return proto


def check_external_data(path: Path, proto: onnx.ModelProto) -> None:
    """Every external weight must lie, whole, in a file beside ``path``."""
    folder = path.resolve().parent
    for tensor in proto.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or folder not in target.parents:
            raise InputError(
                f"{path}: weight {tensor.name} points outside the model's folder "
                f"({location!r}); refusing to read it"
            )
        if not target.is_file():
            raise InputError(
                f"{path} keeps its weights in {location}, which is missing (copy it beside "
                "the model)"
            )
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if target.stat().st_size < end:
            raise InputError(
                f"{target} is truncated: {target.stat().st_size} bytes, but weight "
                f"{tensor.name} ends at byte {end} (copy the complete file)"
            )


def check_single_input(path: Path, proto: onnx.ModelProto) -> None:
    """A classifier takes one image batch: refuse graphs with other than one real input."""
    constants = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in constants]
    if len(inputs) != 1:
        raise InputError(
            f"{path} has {len(inputs)} inputs ({', '.join(inputs) or 'none'}); an image "
            "classifier takes exactly one (the image batch)"
        )


def metadata_of(proto: onnx.ModelProto, path: Path | None = None) -> ExportMetadata | None:
    """The coatnet-export metadata of a model; None if it was not made by coatnet-export.

    Metadata that says it is ours but does not parse, or lacks or garbles a field, is an
    :class:`InputError`: such a model must not be run with guessed preprocessing.
    """
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("producer") != PRODUCER:
        return None
    where = f"{path}: its" if path is not None else "the model's"
    try:
        metadata = ExportMetadata.from_props(props)
    except json.JSONDecodeError:
        broken = [k for k, v in props.items() if k in _JSON_FIELDS and not _is_json(v)]
        problem = f"field(s) {', '.join(broken)} are not valid JSON"
    except TypeError:
        missing = [f.name for f in fields(ExportMetadata) if _required(f) and f.name not in props]
        problem = f"it lacks the field(s) {', '.join(missing) or '(unknown)'}"
    else:
        problems = metadata_problems(metadata)
        if not problems:
            return metadata
        problem = "; ".join(problems[:3])
    raise InputError(
        f"{where} coatnet-export metadata is damaged: {problem} (re-export the model, or "
        "restore its metadata)"
    )


_JSON_FIELDS = {f.name for f in fields(ExportMetadata) if f.type not in ("str", "str | None")}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _required(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _positive_ints(value: Any, count: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (count is None or len(value) == count)
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )


def _finite_numbers(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )


def metadata_problems(m: ExportMetadata) -> list[str]:
    """What is wrong with parsed metadata (the types and ranges inference relies on)."""
    checks = {
        "img_size must be two positive integers": _positive_ints(m.img_size, 2),
        "in_channels and num_classes must be positive integers": _positive_ints(
            [m.in_channels, m.num_classes]
        ),
        "mean and std must hold one finite number per input channel": _finite_numbers(m.mean)
        and _finite_numbers(m.std)
        and len(m.mean) == len(m.std) == m.in_channels,
        "std must be positive": _finite_numbers(m.std) and all(v > 0 for v in m.std),
        "crop_pct must be in (0, 1]": _finite_numbers([m.crop_pct]) and 0 < m.crop_pct <= 1,
        f"interpolation must be one of {', '.join(INTERPOLATIONS)}": m.interpolation
        in INTERPOLATIONS,
        f"crop_mode must be one of {', '.join(CROP_MODES)}": m.crop_mode in CROP_MODES,
        "batch must be 'dynamic' or a positive integer": m.batch == "dynamic"
        or (str(m.batch).isdigit() and int(m.batch) > 0),
        "seed must be an integer in [0, 2**32)": m.seed is None
        or (isinstance(m.seed, int) and not isinstance(m.seed, bool) and 0 <= m.seed < 2**32),
        "architecture and numerics must be objects": isinstance(m.architecture, dict)
        and isinstance(m.numerics, dict),
        "labels must be a list of strings": m.labels is None
        or (isinstance(m.labels, list) and all(isinstance(x, str) for x in m.labels)),
    }
    return [message for message, ok in checks.items() if not ok]


def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims]


KNOWN_ARTEFACTS = {
    MODEL_FILE: ("fp32", "the exported network: float32 [batch, C, H, W] in, logits out"),
    data_name(MODEL_FILE): ("weights", f"the weights of {MODEL_FILE} (beside one over 1.9 GB)"),
    INT8_FILE: ("int8", "the int8 network (coatnet-export quantize)"),
    data_name(INT8_FILE): ("weights", f"the weights of {INT8_FILE}"),
    MANIFEST_FILE: ("manifest", "how the export was made: metadata, graph, checks, artefacts"),
    VALIDATION_FILE: ("report", "the export's parity with PyTorch in onnxruntime"),
    QUANTIZATION_FILE: ("report", "int8 agreement with fp32, latency and fallback steps"),
}
"""What the files every export (and quantize) writes are for; other targets record theirs in
manifest.json's "artefacts"."""


def artefacts(export_dir: Path) -> dict[str, str]:
    """Every file in an export folder: ``kind, size: purpose``."""
    manifest = export_dir / MANIFEST_FILE
    try:
        recorded = json.loads(manifest.read_text()).get("artefacts", {})
    except (OSError, ValueError, AttributeError):
        recorded = {}
    found = {}
    for path in sorted(p for p in export_dir.rglob("*") if p.is_file()):
        name = path.relative_to(export_dir).as_posix()
        if any(part.startswith(".") for part in name.split("/")):
            continue  # a temporary file of a command that is running or was interrupted
        entry = recorded.get(name) if isinstance(recorded.get(name), dict) else {}
        kind, purpose = KNOWN_ARTEFACTS.get(
            name, (entry.get("kind", "other"), entry.get("purpose", "not made by coatnet-export"))
        )
        found[name] = f"{kind}, {path.stat().st_size / 2**10:.0f} KiB: {purpose}"
    return found


@dataclass(frozen=True, kw_only=True)
class InfoOptions:
    """What ``coatnet-export info`` was asked to describe."""

    model: Path
    """An export folder or an .onnx file."""


@dataclass(frozen=True)
class InfoOutcome:
    """What an export holds: flat fields, and every file of its folder with its purpose."""

    fields: dict[str, Any]
    artefacts: dict[str, str]
    warnings: list[str]
    """The int8 model's warnings for this CPU."""

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"field": k, "value": json.dumps(v) if isinstance(v, (list, dict)) else v}
            for k, v in self.fields.items()
        ]

    def artefact_rows(self) -> list[dict[str, str]]:
        return [{"file": name, "what it is for": what} for name, what in self.artefacts.items()]

    def as_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"int8_cpu_warnings": self.warnings} if self.warnings else {}
        if self.artefacts:
            extra["artefacts"] = self.artefacts
        return {**self.fields, **extra}


def run_info(options: InfoOptions) -> InfoOutcome:
    """Describe the export ``options.model``."""
    found = describe(options.model)
    return InfoOutcome(found, found.pop("artefacts", {}), found.pop("int8_cpu_warnings", []))


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
    metadata = metadata_of(proto, model_path)
    if metadata is None:
        description["metadata"] = "none (not made by coatnet-export)"
    else:
        description.update({k: v for k, v in asdict(metadata).items() if v not in (None, {})})
        if isinstance(metadata.quantization, dict):  # does this CPU suit the int8 target?
            from coatnet_export.quantize.presets import int8_warnings, read_cpu

            description["int8_cpu_warnings"] = int8_warnings(metadata.quantization, read_cpu())
    if path.is_dir():
        description["artefacts"] = artefacts(path)
    return description
