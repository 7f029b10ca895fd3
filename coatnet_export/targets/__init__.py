"""Deployment targets: ``coatnet-export package DIR --target NAME`` turns an export into them.

:func:`run_package` takes :class:`PackageOptions` and returns a :class:`PackageOutcome`:
each target is a :class:`Target` in :data:`TARGETS`, whose ``build`` does the work. A target's
module is imported only when it runs, so a target's optional tools cost nothing to the others.
Targets that add files to the export folder itself (e2e, ort) record them with
:func:`coatnet_export.metadata.record_artefacts`; targets that make a new folder (web, triton)
write it to ``options.output`` through :mod:`coatnet_export.output`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coatnet_export.errors import InputError
from coatnet_export.layout import INT8_FILE, MODEL_FILE
from coatnet_export.metadata import ExportMetadata, int8_layout


@dataclass(frozen=True, kw_only=True)
class PackageOptions:
    """What ``coatnet-export package`` was asked to do."""

    target: str
    """A name of :data:`TARGETS`."""
    export_dir: Path
    output: Path | None = None
    """The new folder of a target that makes one (web, triton); None for e2e and ort."""
    force: bool = False
    """Replace what the target would otherwise refuse to overwrite."""
    options: dict[str, Any] = field(default_factory=dict)
    """The target's own command-line options, by parameter name."""


@dataclass
class PackageOutcome:
    """What a target wrote: files, a table of what it checked, and notes."""

    files: list[Path] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    target: str = ""
    """The target's name (:func:`run_package` sets it)."""

    def rows(self) -> list[dict[str, Any]]:
        return self.table

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "files": [str(p) for p in self.files],
            "rows": self.table,
            "notes": self.notes,
        }


def run_package(options: PackageOptions) -> PackageOutcome:
    """Build ``options.target`` from the export in ``options.export_dir`` (no progress lines:
    a target checks its inputs as it goes, and bad input is one ``error:`` line)."""
    target = TARGETS.get(options.target)
    if target is None:
        raise InputError(
            f"unknown target {options.target!r} (choose one of {', '.join(sorted(TARGETS))})"
        )
    outcome = target.build(options)
    outcome.target = target.name
    return outcome


@dataclass(frozen=True)
class Target:
    """One deployment target of the package command."""

    name: str
    summary: str
    build: Callable[[PackageOptions], PackageOutcome]


def lazy(module: str, function: str = "build") -> Callable[[PackageOptions], PackageOutcome]:
    """A build function that imports ``module`` only when it is called."""

    def build(options: PackageOptions) -> PackageOutcome:
        return getattr(importlib.import_module(module), function)(options)

    return build


def export_metadata(export_dir: Path) -> ExportMetadata:
    """The metadata of the export in ``export_dir``; InputError if it holds no export."""
    from coatnet_export.describe import load_proto, metadata_of

    model = export_dir / MODEL_FILE
    if not export_dir.is_dir() or not model.is_file():
        raise InputError(
            f"{export_dir} holds no export (no {MODEL_FILE}; give a folder written by "
            "`coatnet-export --variant ...`)"
        )
    metadata = metadata_of(load_proto(model))
    if metadata is None:
        raise InputError(
            f"{model} has no coatnet-export metadata (package only folders written by "
            "coatnet-export)"
        )
    return metadata


def int8_layout_notes(export_dir: Path, runtime: str) -> list[str]:
    """A note when the export's int8 model is laid out for another runtime than the
    ``runtime`` a target runs it in (``quantize --runtime``): it runs, but slower."""
    import onnx

    from coatnet_export.describe import metadata_of

    path = export_dir / INT8_FILE
    if not path.is_file():
        return []
    metadata = metadata_of(onnx.load(str(path), load_external_data=False), path)
    from coatnet_export.quantize.presets import fastest_int8

    laid_out_for = int8_layout(metadata)
    notes = [fastest_int8(((metadata and metadata.quantization) or {}).get("target_cpu"))]
    if laid_out_for != runtime:
        notes.append(
            f"{INT8_FILE} is laid out for {laid_out_for}, and {runtime} runs it slower (for "
            f"onnxruntime, no faster than fp32): quantize with --runtime {runtime} for this target"
        )
    return notes


TARGETS: dict[str, Target] = {
    "e2e": Target(
        "e2e",
        "preprocessing in the graph: uint8 RGB image [1, H, W, 3] in, logits out",
        lazy("coatnet_export.targets.e2e"),
    ),
    "ort": Target(
        "ort",
        "ORT format (.ort) for onnxruntime mobile, with the reduced-build operator config",
        lazy("coatnet_export.targets.ort"),
    ),
    "web": Target(
        "web",
        "a static site that classifies images in the browser (onnxruntime-web, e2e model)",
        lazy("coatnet_export.targets.web"),
    ),
    "triton": Target(
        "triton",
        "a Triton Inference Server model repository (onnxruntime backend, CPU instances)",
        lazy("coatnet_export.targets.triton"),
    ),
}
