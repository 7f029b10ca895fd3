"""Validate an existing export against its PyTorch reference, rebuilt from the model's metadata."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

from coatnet_export.console import Progress
from coatnet_export.describe import load_proto, metadata_of, resolve_model_path
from coatnet_export.errors import InputError
from coatnet_export.metadata import ExportMetadata
from coatnet_export.sources import CHECKPOINT_FORMATS, CheckpointFormat
from coatnet_export.sources.checkpoint import StateDict, read_checkpoint
from coatnet_export.sources.hub import weights_file
from coatnet_export.sources.model_source import (
    ModelSpec,
    load_reference,
    plan_model,
    weights_sha256,
)
from coatnet_export.sources.resources import check_memory
from coatnet_export.validate import (
    NOTHING_TO_VALIDATE,
    CaseResult,
    Gates,
    add_reference_outputs,
    build_cases,
    nothing_to_validate,
    validate_onnx,
)
from models import Numerics, TimmSpec, VariantSpec, architecture_from_dict

LARGE_BATCH = 4
"""The batch of random inputs that exercises a dynamic batch axis."""


def checkpoint_format(metadata: ExportMetadata) -> CheckpointFormat:
    """The checkpoint format the metadata records (``auto`` for none or one not known)."""
    recorded = metadata.checkpoint_format
    return next((f for f in CHECKPOINT_FORMATS if f == recorded), "auto")


def recorded_architecture(
    model_path: Path, metadata: ExportMetadata
) -> tuple[VariantSpec | TimmSpec, Numerics]:
    """The architecture and numerics the metadata records; damaged ones are an InputError."""
    try:
        return architecture_from_dict(metadata.architecture), Numerics(**metadata.numerics)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"{model_path}: its coatnet-export metadata is damaged: the architecture or "
            f"numerics cannot be read ({type(exc).__name__}: {exc}); re-export the model"
        ) from None


@dataclass(frozen=True, kw_only=True)
class ValidateOptions:
    """What ``coatnet-export validate`` was asked to do."""

    model: Path
    """The export folder or its .onnx file."""
    checkpoint: Path | None = None
    """The checkpoint it was exported from (None: the seeded weights its metadata records)."""
    images: tuple[Path, ...] = ()
    samples: int = 3
    gates: Gates = field(default_factory=Gates)
    threads: int | None = None
    runtime: str = "onnxruntime"
    precision: str = "f32"


@dataclass(frozen=True)
class ValidateOutcome:
    """Each case's comparison with the PyTorch reference."""

    model_path: Path
    results: list[CaseResult]
    warnings: list[str] = field(default_factory=list)
    runtime: str = "onnxruntime"

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def rows(self) -> list[dict]:
        return [r.as_dict() for r in self.results]

    def as_dict(self) -> dict:
        return {
            "model": str(self.model_path),
            "runtime": self.runtime,
            "passed": self.passed,
            "results": self.rows(),
            "warnings": self.warnings,
        }


def run_validate(options: ValidateOptions, progress: Progress) -> ValidateOutcome:
    """Rebuild the reference the metadata describes and compare it with the ONNX model run in
    ``runtime``: read the model's record -> plan the reference -> build it -> reference outputs
    -> validate."""
    opts = options
    model_path, metadata = read_record(opts)
    batch = None if metadata.batch == "dynamic" else int(metadata.batch)
    if nothing_to_validate(opts.samples, batch, LARGE_BATCH, list(opts.images), recorded=False):
        raise InputError(NOTHING_TO_VALIDATE)
    spec, state_dict = plan_reference(opts, model_path, metadata)
    held = opts.samples * (batch or 1) + (LARGE_BATCH if batch is None else 0)
    check_memory(spec, batch or LARGE_BATCH, held, "the model is too large for this machine")
    warnings = []
    progress.expect(3)
    with progress.step("building the PyTorch reference"):
        reference = load_reference(spec, state_dict, str(opts.checkpoint), metadata.seed or 0)
        if weights_sha256(reference.model) != metadata.weights_sha256:
            warnings.append(
                "these weights differ from the ones the model was exported from "
                f"({metadata.weights})"
            )
    with progress.step("computing PyTorch reference outputs"):
        cases, skipped = build_cases(
            spec.in_channels,
            spec.img_size,
            metadata.seed or 0,
            opts.samples,
            batch,
            LARGE_BATCH,
            list(opts.images),
            metadata.preprocessing(),
        )
        add_reference_outputs(reference.model, cases)
        warnings += [f"skipped unreadable image {s}" for s in skipped]
    del reference, state_dict
    gc.collect()
    with progress.step(f"validating {len(cases)} case(s) in {opts.runtime}"):
        results = validate_onnx(
            model_path,
            cases,
            opts.gates,
            threads=opts.threads,
            runtime=opts.runtime,
            precision=opts.precision,
        )
    return ValidateOutcome(model_path, results, warnings, opts.runtime)


def read_record(opts: ValidateOptions) -> tuple[Path, ExportMetadata]:
    """The model file and the metadata coatnet-export recorded in it (refused without one, or
    without the weights it names)."""
    model_path = resolve_model_path(opts.model)
    metadata = metadata_of(load_proto(model_path), model_path)
    if metadata is None:
        raise InputError(
            f"{model_path} has no coatnet-export metadata, so its architecture is "
            "unknown; re-export it with coatnet-export"
        )
    if opts.checkpoint is None and metadata.seed is None:
        raise InputError(f"{model_path} was exported from {metadata.weights}; pass --checkpoint")
    return model_path, metadata


def plan_reference(
    opts: ValidateOptions, model_path: Path, metadata: ExportMetadata
) -> tuple[ModelSpec, StateDict | None]:
    """The recorded architecture at the recorded size, with the checkpoint's tensors (none for
    seeded weights)."""
    architecture, numerics = recorded_architecture(model_path, metadata)
    img_size = (metadata.img_size[0], metadata.img_size[1])
    if opts.checkpoint is None:
        spec = ModelSpec(
            architecture, img_size, metadata.in_channels, metadata.num_classes, numerics
        )
        return spec, None
    source = read_checkpoint(weights_file(opts.checkpoint), checkpoint_format(metadata))
    return plan_model(architecture, source, img_size, metadata.in_channels, metadata.num_classes)
