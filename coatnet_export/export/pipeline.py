"""The export command's data flow, top to bottom.

check the paths -> [a PyTorch child process: check against the model, build the reference,
record its outputs, bake biases, fold BatchNorm, export ONNX, package] -> validate in
onnxruntime -> publish (or reject).

The PyTorch half (:mod:`coatnet_export.export.build`) runs in a spawned child that exits
before validation: this process never imports PyTorch, so the export's peak memory is the
larger of the two halves, not onnxruntime's on top of what PyTorch and its exporter leave
behind (about 0.5 GiB).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from coatnet_export.child import run_in_child
from coatnet_export.console import Progress
from coatnet_export.errors import InputError, writing
from coatnet_export.export.external_data import EXTERNAL_DATA_THRESHOLD, GraphSummary
from coatnet_export.export.onnx_export import AttentionGraph, Exporter
from coatnet_export.layout import MANIFEST_FILE, MODEL_FILE, VALIDATION_FILE
from coatnet_export.metadata import ExportMetadata, write_json
from coatnet_export.output import (
    atomic_file,
    check_destination,
    check_side_file,
    claim,
    publish,
    staging,
)
from coatnet_export.sources import CheckpointFormat
from coatnet_export.validate import (
    NOTHING_TO_VALIDATE,
    Case,
    CaseResult,
    Gates,
    nothing_to_validate,
    validate_onnx,
)
from models import TimmSpec, VariantSpec

EXPORT_STEPS = "coatnet_export.export.build:export_steps"
"""The PyTorch half, named (importing it here would import PyTorch)."""


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """Everything the export command was asked to do."""

    architecture: VariantSpec | TimmSpec | None = None
    """A named architecture; None reads it from the checkpoint (a timm folder's config.json,
    or the keys and shapes)."""
    output: Path | None = None
    """None: ./<variant name>."""
    img_size: tuple[int, int] | None = None
    """None: the checkpoint's training resolution, or 224 x 224."""
    in_channels: int | None = None
    num_classes: int | None = None
    checkpoint: Path | None = None
    checkpoint_format: CheckpointFormat = "auto"
    reference_outputs: Path | None = None
    """An .npz of inputs ``x`` and outputs ``y`` recorded by the framework that trained it."""
    seed: int = 0
    exporter: Exporter = "dynamo"
    opset: int | None = None
    attention: AttentionGraph | None = None
    """None: fused (ONNX Attention) where the exporter and opset allow it, else matmul."""
    batch: int | None = None
    """None: dynamic batch axis; an integer fixes it."""
    mean: tuple[float, ...] | None = None
    """None, as std, crop_pct, interpolation and crop_mode: the checkpoint's config.json
    (pretrained_cfg), else Preprocessing's defaults (ImageNet, 0.875, bicubic, center)."""
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    crop_mode: str | None = None
    labels: list[str] | None = None
    """None: the checkpoint's config.json label names, if it has them."""
    validate: bool = True
    images: list[Path] = field(default_factory=list)
    samples: int = 3
    large_batch: int = 4
    gates: Gates = field(default_factory=Gates)
    threads: int | None = None
    force: bool = False
    report: Path | None = None
    """Also write the validation report here (checked up front, written with the model)."""
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    in_process: bool | None = None
    """Run the PyTorch half here (True: debuggers, profilers) or in a child process (False);
    None: in a child unless this process has imported PyTorch already (it then holds PyTorch's
    memory anyway, and a child would import it a second time) or is a daemonic worker (which
    cannot start one)."""


@dataclass
class ExportOutcome:
    """What an export produced; ``passed`` is False when validation rejected the model."""

    directory: Path
    metadata: ExportMetadata
    graph: GraphSummary
    results: list[CaseResult]
    passed: bool
    baked_bias_bytes: int
    folded_batchnorms: int
    timings: dict[str, float]
    warnings: list[str]
    skipped_images: list[str]

    def rows(self) -> list[dict]:
        """One row per validation case (none without validation)."""
        return [r.as_dict() for r in self.results]

    def as_dict(self) -> dict:
        return {"directory": str(self.directory), **self.manifest()}

    def manifest(self) -> dict:
        files = {name: (self.directory / name).stat().st_size for name in self.graph.files}
        return {
            "metadata": asdict(self.metadata),
            "files": files,
            "graph": asdict(self.graph),
            "baked_bias_bytes": self.baked_bias_bytes,
            "folded_batchnorms": self.folded_batchnorms,
            "validation": self.validation_report(),
            "timings_s": self.timings,
            "warnings": self.warnings,
        }

    def validation_report(self) -> dict:
        return {
            "passed": self.passed,
            "results": [r.as_dict() for r in self.results],
            "skipped_images": self.skipped_images,
        }


@dataclass
class BuiltModel:
    """What the PyTorch half hands back: the staged model and the cases with their reference
    outputs (no PyTorch object)."""

    options: ExportOptions
    """The options resolved against the model (preprocessing and labels filled in)."""
    metadata: ExportMetadata
    graph: GraphSummary
    cases: list[Case]
    skipped_images: list[str]
    baked_bias_bytes: int
    folded_batchnorms: int
    warnings: list[str]
    export_s: float


def run_export(opts: ExportOptions, progress: Progress) -> ExportOutcome:
    """Export, check and validate one model; the output directory appears only when it passes.

    Every input and output is checked before the heavy work, and the output is locked
    against a second writer until it is published. A model that fails validation is moved to
    ``<output>.rejected`` instead; the report (``opts.report``) is written in both cases.
    """
    inputs = input_paths(opts)
    check_request(opts, inputs)
    here = pytorch_in_process(opts.in_process)
    with run_in_child(EXPORT_STEPS, (opts,), progress, in_process=here) as half:
        output: Path = half.next()
        with (
            claim(output, opts.force, inputs) as output,
            staging(output) as stage,
            writing(output),
        ):
            try:
                built: BuiltModel = half.next(stage)
            finally:  # the child has exited (memory back), or been stopped before clean-up
                half.close()
            return validate_and_publish(built, stage, output, progress)


def pytorch_in_process(asked: bool | None) -> bool:
    """Whether the PyTorch half runs here: as asked, else when a child would not help (this
    process has imported torch already) or cannot be started (a daemonic worker process)."""
    if asked is not None:
        return asked
    return "torch" in sys.modules or multiprocessing.current_process().daemon


def input_paths(opts: ExportOptions) -> list[Path]:
    """Every file or folder the export reads (an output must not hold one of them)."""
    named = [opts.checkpoint, opts.reference_outputs, *opts.images]
    return [path for path in named if path is not None]


def check_request(opts: ExportOptions, inputs: list[Path]) -> None:
    """What can be checked without the model (the rest: the PyTorch half's plan)."""
    if opts.output is not None:
        check_destination(opts.output, opts.force, inputs)
    if opts.report is not None:
        outputs = [("--output", opts.output)] if opts.output is not None else []
        check_side_file(opts.report, "--report", inputs, outputs)
    if opts.validate and nothing_to_validate(
        opts.samples, opts.batch, opts.large_batch, opts.images, opts.reference_outputs is not None
    ):
        raise InputError(NOTHING_TO_VALIDATE)


def validate_and_publish(
    built: BuiltModel, stage: Path, output: Path, progress: Progress
) -> ExportOutcome:
    """Validate the staged model, write its manifest and report, publish it (or reject it)."""
    opts = built.options
    start = time.perf_counter()
    results = validate_model(stage / MODEL_FILE, built.cases, opts, progress)
    validate_s = round(time.perf_counter() - start, 2)
    outcome = ExportOutcome(
        stage,
        built.metadata,
        built.graph,
        results,
        all(r.passed for r in results),
        built.baked_bias_bytes,
        built.folded_batchnorms,
        {"export_s": built.export_s, "total_s": round(built.export_s + validate_s, 2)},
        built.warnings,
        built.skipped_images,
    )
    write_json(stage / MANIFEST_FILE, outcome.manifest())
    write_json(stage / VALIDATION_FILE, outcome.validation_report())
    destination = output if outcome.passed else rejected_path(output)
    publish_with_report(stage, destination, opts.report, outcome.validation_report())
    outcome.directory = destination
    return outcome


def validate_model(
    path: Path,
    cases: list[Case],
    opts: ExportOptions,
    progress: Progress,
) -> list[CaseResult]:
    """Each case in onnxruntime (none without validation), in a session that holds the weights
    once (no pre-packed copies, no arena): the export's peak memory stays near one copy of the
    weights, and five cases do not need the speed."""
    if not opts.validate:
        return []
    with progress.step(f"validating {len(cases)} case(s) in onnxruntime"):
        return validate_onnx(path, cases, opts.gates, threads=opts.threads, low_memory=True)


def publish_with_report(stage: Path, destination: Path, report: Path | None, payload: dict) -> None:
    """Publish ``stage``; the report, written first under a temporary name, follows it."""
    if report is None:
        publish(stage, destination)
        return
    with atomic_file(report) as tmp:
        with writing(report, "--report"):
            write_json(tmp, payload)
        publish(stage, destination)


def rejected_path(output: Path) -> Path:
    """Where a model that failed validation is kept for inspection."""
    return output.with_name(output.name + ".rejected")
