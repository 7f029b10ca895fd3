"""The PyTorch half of an export, run in a child process (see :mod:`coatnet_export.child`).

plan (every check that needs the model) -> [the caller claims the output] -> build the
reference -> record reference outputs -> bake biases, fold BatchNorm -> export ONNX -> package.
What it returns (:class:`~coatnet_export.export.pipeline.BuiltModel`) holds no PyTorch object,
so the caller validates in onnxruntime without PyTorch in its memory.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

import coatnet_export
from coatnet_export.console import Progress
from coatnet_export.errors import InputError
from coatnet_export.export.external_data import package_model
from coatnet_export.export.onnx_export import (
    GraphChoice,
    choose_graph,
    export_onnx,
    release_exporter_memory,
)
from coatnet_export.export.pipeline import BuiltModel, ExportOptions
from coatnet_export.export.transforms import (
    bake_relative_biases,
    fold_attention_scales,
    fold_batchnorms,
    transpose_token_linears,
    use_onnx_attention,
)
from coatnet_export.layout import MODEL_FILE
from coatnet_export.metadata import ExportMetadata
from coatnet_export.preprocess import Preprocessing
from coatnet_export.sources.checkpoint import StateDict, read_checkpoint
from coatnet_export.sources.hub import HubFolder, read_hub_folder
from coatnet_export.sources.model_source import (
    ModelSpec,
    ReferenceModel,
    load_reference,
    plan_model,
    weights_sha256,
)
from coatnet_export.sources.resources import check_memory
from coatnet_export.validate import (
    Case,
    add_reference_outputs,
    build_cases,
    read_recorded,
    recorded_case,
)
from models import TIMM_VARIANTS, TimmSpec, VariantSpec

PREPROCESSING_OPTIONS = ("mean", "std", "crop_pct", "interpolation", "crop_mode")
RESIZE_DESCRIPTIONS = {
    "center": "scale to cover img_size / crop_pct keeping aspect, then centre crop",
    "squash": "scale each axis to floor(img_size / crop_pct) (aspect not kept), then centre crop",
}


@dataclass(frozen=True)
class ExportPlan:
    """The options resolved once against the model: what the heavy part builds."""

    options: ExportOptions
    spec: ModelSpec
    graph: GraphChoice
    preprocessing: Preprocessing
    recorded_cases: list[Case]
    """The --reference-outputs case, if any."""
    checkpoint_format: str | None
    output: Path
    """--output, or ./<architecture name>."""


def export_steps(opts: ExportOptions, progress: Progress) -> Generator[Path, Path, BuiltModel]:
    """Yield the output path once every check passed; given the staging folder the caller
    claimed, build the model into it."""
    plan, state_dict = plan_export(opts)
    stage = yield plan.output
    return build_model(plan, state_dict, stage, progress)


def plan_export(opts: ExportOptions) -> tuple[ExportPlan, StateDict | None]:
    """Every check before the heavy work; the plan and the checkpoint's weights."""
    hub = read_hub_folder(opts.checkpoint) if opts.checkpoint and opts.checkpoint.is_dir() else None
    opts = with_hub_config(opts, hub)
    graph, recorded = resolve_request(opts)
    weights = hub.weights if hub else opts.checkpoint
    checkpoint = read_checkpoint(weights, opts.checkpoint_format) if weights else None
    spec, state_dict = plan_model(
        opts.architecture or hub_architecture(hub),
        checkpoint,
        opts.img_size,
        opts.in_channels,
        opts.num_classes,
    )
    opts = with_architecture_defaults(opts, spec.architecture)
    opts = with_hub_labels(opts, hub, spec.num_classes)
    preprocessing, recorded_cases = check_model_fits(opts, spec, recorded)
    output = opts.output or Path(spec.architecture.name)
    checkpoint_format = checkpoint.format if checkpoint else None
    plan = ExportPlan(opts, spec, graph, preprocessing, recorded_cases, checkpoint_format, output)
    return plan, state_dict


def build_model(
    plan: ExportPlan, state_dict: StateDict | None, stage: Path, progress: Progress
) -> BuiltModel:
    """The heavy part: reference, reference outputs, transforms, export, package."""
    opts = plan.options
    progress.expect(6 if opts.validate else 4)
    clock = time.perf_counter()
    reference, sha256 = build_reference(plan, state_dict, progress)
    del state_dict
    cases, skipped = reference_cases(plan, reference, progress)
    metadata = export_metadata(plan, reference, sha256)
    bias_bytes, folded = transform(reference, metadata, progress)
    warnings = reference.warnings + reference_warnings(metadata, skipped)
    model_path = stage / MODEL_FILE
    write_onnx(reference, model_path, plan.graph, opts.batch, progress)
    del reference
    release_exporter_memory()
    with progress.step("packaging and checking the ONNX model"):
        graph = package_model(model_path, metadata, opts.external_data_threshold)
    return BuiltModel(
        options=opts,
        metadata=metadata,
        graph=graph,
        cases=cases,
        skipped_images=skipped,
        baked_bias_bytes=bias_bytes,
        folded_batchnorms=folded,
        warnings=warnings,
        export_s=round(time.perf_counter() - clock, 2),
    )


def with_hub_config(opts: ExportOptions, hub: HubFolder | None) -> ExportOptions:
    """Preprocessing options left unset take what a timm folder's config.json records (mean,
    std, crop_pct, interpolation, crop_mode)."""
    config = hub.config if hub else None
    if config is None:
        return opts
    recorded = config.pretrained_cfg.preprocessing()
    unset = {name: value for name, value in recorded.items() if getattr(opts, name) is None}
    return replace(opts, **unset)


def with_hub_labels(opts: ExportOptions, hub: HubFolder | None, classes: int) -> ExportOptions:
    """Without --labels, a timm folder's class names, when they name the model's classes."""
    labels = hub.config.labels if hub and hub.config else None
    if opts.labels is not None or labels is None or len(labels) != classes:
        return opts
    return replace(opts, labels=list(labels))


def hub_architecture(hub: HubFolder | None) -> TimmSpec | None:
    """The timm architecture a folder's config.json names (None without one)."""
    if hub is None or hub.config is None:
        return None
    name = hub.config.architecture
    if name not in TIMM_VARIANTS:
        raise InputError(
            f"{hub.path / 'config.json'} names architecture {name!r}, which is not one of timm's "
            f"CoAtNet family ({', '.join(TIMM_VARIANTS)})"
        )
    return TIMM_VARIANTS[name]


def with_architecture_defaults(
    opts: ExportOptions, architecture: VariantSpec | TimmSpec
) -> ExportOptions:
    """Preprocessing options still unset take the published weights' (timm's pretrained_cfg
    defaults in the architecture table), so that a bare timm file needs no --mean/--std."""
    if not isinstance(architecture, TimmSpec):
        return opts
    defaults = asdict(architecture.preprocessing)
    unset = {name: value for name, value in defaults.items() if getattr(opts, name) is None}
    return replace(opts, **unset)


def resolve_request(
    opts: ExportOptions,
) -> tuple[GraphChoice, tuple[np.ndarray, np.ndarray] | None]:
    """What the options decide before the model is known (the paths were checked by the
    caller): preprocessing numbers, the graph's opset and attention (resolved here, once), the
    recorded outputs."""
    preprocessing_for(opts, (32, 32))
    graph = choose_graph(opts.exporter, opts.opset, opts.attention)
    if opts.reference_outputs is not None and opts.validate:
        return graph, read_recorded(opts.reference_outputs)
    return graph, None


def preprocessing_for(opts: ExportOptions, size: tuple[int, int]) -> Preprocessing:
    """The options' preprocessing at ``size``; Preprocessing's defaults for unset fields."""
    chosen: dict[str, Any] = {
        name: tuple(value) if isinstance(value, (list, tuple)) else value
        for name in PREPROCESSING_OPTIONS
        if (value := getattr(opts, name)) is not None
    }
    try:
        return Preprocessing(size, **chosen)
    except ValueError as exc:
        raise InputError(f"{exc} (check --mean, --std, --crop-pct and --crop-mode)") from None


def check_model_fits(
    opts: ExportOptions, spec: ModelSpec, recorded: tuple[np.ndarray, np.ndarray] | None
) -> tuple[Preprocessing, list[Case]]:
    """Checks that need the model: channels, labels, recorded shapes, memory."""
    preprocessing = preprocessing_for(opts, spec.img_size)
    if preprocessing.channels != spec.in_channels:
        raise InputError(
            f"--mean/--std give {preprocessing.channels} channel(s) but the model "
            f"takes {spec.in_channels}"
        )
    if opts.labels is not None and len(opts.labels) != spec.num_classes:
        raise InputError(
            f"the labels file has {len(opts.labels)} labels but the model has "
            f"{spec.num_classes} classes"
        )
    cases = []
    if recorded is not None and opts.reference_outputs is not None:
        cases.append(
            recorded_case(
                opts.reference_outputs,
                recorded,
                spec.in_channels,
                spec.img_size,
                spec.num_classes,
                opts.batch,
            )
        )
    largest = max([opts.batch or max(opts.large_batch, 2), *(len(c.inputs) for c in cases)])
    held = opts.samples * (opts.batch or 1) + (opts.large_batch if opts.batch is None else 0)
    check_memory(spec, largest, held + sum(len(c.inputs) for c in cases) if opts.validate else 0)
    return preprocessing, cases


def build_reference(
    plan: ExportPlan, state_dict: StateDict | None, progress: Progress
) -> tuple[ReferenceModel, str]:
    """The PyTorch reference with its weights, and their SHA-256."""
    spec, opts = plan.spec, plan.options
    with progress.step(
        f"building {spec.architecture.name} at {spec.img_size[0]}x{spec.img_size[1]}"
    ):
        reference = load_reference(spec, state_dict, str(opts.checkpoint), opts.seed)
        sha256 = weights_sha256(reference.model)
    progress.note(f"weights: {reference.weights}")
    for warning in reference.warnings:
        progress.note(f"warning: {warning}")
    return reference, sha256


def reference_cases(
    plan: ExportPlan, reference: ReferenceModel, progress: Progress
) -> tuple[list[Case], list[str]]:
    """The validation cases with the reference's outputs, and the images skipped (none
    without validation)."""
    opts, spec = plan.options, plan.spec
    if not opts.validate:
        return [], []
    with progress.step("computing PyTorch reference outputs"):
        cases, skipped = build_cases(
            spec.in_channels,
            spec.img_size,
            opts.seed,
            opts.samples,
            opts.batch,
            opts.large_batch,
            opts.images,
            plan.preprocessing,
        )
        cases += plan.recorded_cases
        add_reference_outputs(reference.model, cases)
    return cases, skipped


def export_metadata(plan: ExportPlan, reference: ReferenceModel, sha256: str) -> ExportMetadata:
    """What the exported model records about itself."""
    opts, spec, preprocessing = plan.options, plan.spec, plan.preprocessing
    return ExportMetadata(
        variant=spec.architecture.name,
        architecture=spec.architecture.as_dict(),
        img_size=list(spec.img_size),
        in_channels=spec.in_channels,
        num_classes=spec.num_classes,
        mean=list(preprocessing.mean),
        std=list(preprocessing.std),
        crop_pct=preprocessing.crop_pct,
        interpolation=preprocessing.interpolation,
        resize=RESIZE_DESCRIPTIONS[preprocessing.crop_mode],
        crop_mode=preprocessing.crop_mode,
        exporter=plan.graph.exporter,
        opset=plan.graph.opset,
        batch="dynamic" if opts.batch is None else str(opts.batch),
        weights=reference.weights,
        seed=None if opts.checkpoint else opts.seed,
        checkpoint_format=plan.checkpoint_format,
        weights_sha256=sha256,
        numerics=spec.numerics.as_dict(),
        versions=versions(),
        labels=opts.labels,
        attention=plan.graph.attention,
    )


def transform(
    reference: ReferenceModel, metadata: ExportMetadata, progress: Progress
) -> tuple[int, int]:
    """Bake the biases, fold BatchNorm and the attention scales; the bytes the biases add and
    the BatchNorms folded."""
    with progress.step("baking relative biases, folding BatchNorm and attention scales"):
        bias_bytes = bake_relative_biases(reference.model)
        folded = fold_batchnorms(reference.model)
        scales = fold_attention_scales(reference.model)
        transpose_token_linears(reference.model)  # after the scales: it moves the weights
        if metadata.attention == "fused":
            use_onnx_attention(reference.model)
    progress.note(
        f"baked biases add {bias_bytes / 2**20:.1f} MiB; folded {folded} BatchNorms and "
        f"{scales} attention scales"
    )
    return bias_bytes, folded


def write_onnx(
    reference: ReferenceModel,
    path: Path,
    graph: GraphChoice,
    batch: int | None,
    progress: Progress,
) -> None:
    """Export the transformed reference to ``path``, its weights beside it."""
    with progress.step(
        f"exporting with the {graph.exporter} exporter (opset {graph.opset}, "
        f"{graph.attention} attention)"
    ):
        export_onnx(
            reference.model,
            path,
            graph.exporter,
            graph.opset,
            batch,
            # always beside the graph: dynamo then streams the weights to disk instead of
            # building a protobuf copy; packaging brings small models back into one file
            external_data=True,
        )


def reference_warnings(metadata: ExportMetadata, skipped: list[str]) -> list[str]:
    warnings = []
    if metadata.weights.startswith("seeded"):
        warnings.append("exported seeded random weights, not a trained model (pass --checkpoint)")
    if skipped:
        warnings.append(f"skipped {len(skipped)} unreadable image(s)")
    return warnings


def versions() -> dict[str, str]:
    return {
        "coatnet_export": coatnet_export.__version__,
        "torch": str(torch.__version__),  # a str subclass that would import torch when read
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
