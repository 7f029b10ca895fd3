"""The description an export carries: in the ONNX model's metadata_props and in manifest.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coatnet_export.layout import MANIFEST_FILE

if TYPE_CHECKING:  # onnx and numpy load when a model is read, not when the command line starts
    import onnx

    from coatnet_export.preprocess import Preprocessing

PRODUCER = "coatnet-export"


@dataclass
class ExportMetadata:
    """Everything inference needs to reproduce preprocessing, and what produced the model."""

    variant: str
    architecture: dict[str, Any]
    img_size: list[int]
    in_channels: int
    num_classes: int
    mean: list[float]
    std: list[float]
    crop_pct: float
    interpolation: str
    resize: str
    exporter: str
    opset: int
    batch: str
    weights: str
    weights_sha256: str
    numerics: dict[str, bool]
    versions: dict[str, str]
    seed: int | None = None
    checkpoint_format: str | None = None
    labels: list[str] | None = None
    attention: str = "matmul"
    """How attention is in the graph: "fused" (ONNX Attention nodes) or "matmul"."""
    crop_mode: str = "center"
    """center or squash (see Preprocessing); exports made before it was recorded: center."""
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def preprocessing(self) -> Preprocessing:
        """The preprocessing the model was exported with."""
        from coatnet_export.preprocess import Preprocessing

        return Preprocessing(
            (self.img_size[0], self.img_size[1]),
            tuple(self.mean),
            tuple(self.std),
            self.crop_pct,
            self.interpolation,
            self.crop_mode,
        )

    def to_props(self) -> dict[str, str]:
        """metadata_props entries: strings as they are, everything else as JSON."""
        props = {"producer": PRODUCER}
        for key, value in asdict(self).items():
            if value is None:
                continue
            props[key] = value if isinstance(value, str) else json.dumps(value)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ExportMetadata:
        """Parse metadata_props written by :meth:`to_props`; ValueError if they are not ours."""
        if props.get("producer") != PRODUCER:
            raise ValueError("the model has no coatnet-export metadata")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in props:
                continue
            raw = props[f.name]
            values[f.name] = raw if f.type in ("str", "str | None") else json.loads(raw)
        return cls(**values)


def int8_layout(metadata: ExportMetadata | None) -> str:
    """The runtime an int8 model's graph is laid out for (``quantize --runtime`` or
    ``--recipe``); onnxruntime where nothing is recorded."""
    return ((metadata and metadata.quantization) or {}).get("laid_out_for", "onnxruntime")


def write_props(model: onnx.ModelProto, metadata: ExportMetadata) -> None:
    """Replace the model's metadata_props with ``metadata``."""
    del model.metadata_props[:]
    import onnx

    onnx.helper.set_model_props(model, metadata.to_props())


def write_json(path: Path, payload: dict[str, Any] | list[Any]) -> None:
    """Write JSON atomically: to a temporary name of its own beside ``path``, then rename (a
    failed write, a full disk, leaves nothing behind; two writers never tear the file)."""
    from coatnet_export.output import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def record_artefacts(export_dir: Path, artefacts: dict[str, tuple[str, str]]) -> None:
    """Record files of ``export_dir`` in its manifest.json under "artefacts".

    ``artefacts`` maps a path relative to ``export_dir`` to (kind, purpose); each entry gets its
    size in bytes (a folder: all its files). Entries whose file is gone are dropped.
    """
    path = export_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    entries = manifest.setdefault("artefacts", {})
    for name, (kind, purpose) in artefacts.items():
        entries[name] = {"kind": kind, "purpose": purpose, "bytes": _bytes(export_dir / name)}
    for name in [n for n in entries if not (export_dir / n).exists()]:
        del entries[name]
    write_json(path, manifest)


def _bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
