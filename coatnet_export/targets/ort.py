"""The ort target: ORT format models for onnxruntime mobile and reduced (minimal) builds.

``onnxruntime.tools.convert_onnx_models_to_ort`` converts the export's models (fp32, int8, and
the e2e models when present) to ``DIR/ort/*.ort`` and writes the operators-and-types config
that a reduced onnxruntime build takes (``build.py --minimal_build --include_ops_by_config
required_operators_and_types.config --enable_reduced_operator_type_support``). Each ``.ort``
is loaded in onnxruntime and compared with its ``.onnx``; the mobile usability of each model
(how much of it the NNAPI and CoreML execution providers could run) is summarised.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from coatnet_export import layout
from coatnet_export.errors import GateFailed, InputError
from coatnet_export.layout import data_file
from coatnet_export.metadata import ExportMetadata, record_artefacts
from coatnet_export.output import claim, publish, staging
from coatnet_export.targets import (
    PackageOptions,
    PackageOutcome,
    export_metadata,
    int8_layout_notes,
)

ORT_DIR = "ort"
MODELS = {**layout.MODELS, "e2e": layout.E2E_FILE, "e2e-int8": layout.E2E_INT8_FILE}
"""Models the target converts, by the name --ort-models takes."""
FLATBUFFER_LIMIT = 2**31 - 1
"""An ORT format model is one FlatBuffer, which cannot exceed 2 GiB."""
INT8_MAX_REL_ERROR = 1e-2
"""int8 .ort against int8 .onnx: the same quantized graph, but fusions may requantize in a
different order on the target platform; a step or two of int8 rounding is allowed."""
CONFIG_PURPOSE = (
    "the operators and types these models use: build a reduced onnxruntime with "
    "build.py --minimal_build --include_ops_by_config <this file> "
    "--enable_reduced_operator_type_support"
)


@dataclass
class Coverage:
    """One verdict of onnxruntime's mobile checker: how much of a model a provider runs."""

    verdict: str
    """YES, MAYBE or NO: is the provider worth trying."""
    supported_nodes: int
    nodes: int
    partitions: int

    def __str__(self) -> str:
        return (
            f"{self.verdict} ({self.supported_nodes}/{self.nodes} nodes, {self.partitions} part.)"
        )


@dataclass
class Usability:
    """How well an execution provider could run a model, as is and with fixed input shapes."""

    provider: str
    as_is: Coverage
    fixed_shapes: Coverage
    unsupported_ops: list[str]

    def summary(self) -> str:
        if self.as_is == self.fixed_shapes:
            return str(self.as_is)
        return f"{self.as_is}; fixed shapes: {self.fixed_shapes}"


def load_tools() -> tuple[ModuleType, ModuleType]:
    """onnxruntime's converter and mobile usability checker; InputError when missing."""
    try:
        from onnxruntime.tools import convert_onnx_models_to_ort as converter
        from onnxruntime.tools.mobile_helpers import usability_checker
    except ImportError as exc:
        raise InputError(
            f"the ORT format tools cannot be imported ({exc}); install onnxruntime with its "
            "tools and flatbuffers: pip install onnxruntime flatbuffers"
        ) from None
    return converter, usability_checker


def choose_models(export_dir: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """The models to convert, by kind; every one the folder holds when ``names`` is empty."""
    if names:
        missing = [n for n in names if not (export_dir / MODELS[n]).is_file()]
        if missing:
            raise InputError(
                f"{export_dir} holds no {', '.join(MODELS[n] for n in missing)} (quantize "
                "or package --target e2e first, or leave them out of --ort-models)"
            )
        return {n: export_dir / MODELS[n] for n in names}
    return {n: export_dir / f for n, f in MODELS.items() if (export_dir / f).is_file()}


def check_size(model: Path) -> None:
    """Refuse a model the ORT format cannot hold."""
    size = model.stat().st_size + (
        data_file(model).stat().st_size if data_file(model).exists() else 0
    )
    if size > FLATBUFFER_LIMIT:
        raise InputError(
            f"{model.name} holds {size / 2**30:.1f} GiB: an ORT format model is one FlatBuffer, "
            "capped at 2 GiB (convert the int8 models only: --ort-models int8 --ort-models "
            "e2e-int8, or deploy the .onnx with its external weights)"
        )


def convert(
    converter: ModuleType, models: dict[str, Path], stage: Path, style: str, platform: str
) -> str:
    """Convert ``models`` into ``stage``; returns the converter's log."""
    source = stage / ".source"
    source.mkdir()
    for model in models.values():
        for path in (model, data_file(model)):
            if path.exists():
                os.symlink(path.resolve(), source / path.name)
    log = io.StringIO()
    styles = {
        "fixed": converter.OptimizationStyle.Fixed,
        "runtime": converter.OptimizationStyle.Runtime,
    }
    try:
        with contextlib.redirect_stdout(log), _quiet():
            converter.convert_onnx_models_to_ort(
                source,
                output_dir=stage,
                optimization_styles=[styles[style]],
                target_platform=platform,
                enable_type_reduction=True,
            )
    except Exception as exc:  # the converter raises onnxruntime's and its own types
        lines = [line for line in log.getvalue().splitlines() if "Error" in line]
        reason = lines[-1] if lines else str(exc).splitlines()[0]
        raise InputError(f"onnxruntime could not convert to the ORT format: {reason}") from None
    finally:
        for link in source.iterdir():
            link.unlink()
        source.rmdir()
    return log.getvalue()


@contextlib.contextmanager
def _quiet():
    """Keep onnxruntime's and its tools' progress logging off the console."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        ort.set_default_logger_severity(2)


def ort_name(model: Path, style: str) -> str:
    """The converter's name for ``model``'s ORT file."""
    suffix = ".with_runtime_opt.ort" if style == "runtime" else ".ort"
    return model.name.removesuffix(".onnx") + suffix


def check_inputs(model: Path, metadata: ExportMetadata) -> list[np.ndarray]:
    """Inputs to compare a model's .ort and .onnx on: photos-like images or random tensors."""
    from coatnet_export.describe import load_proto
    from coatnet_export.targets.e2e import INPUT_NAME, check_images, rgb_pixels

    graph = load_proto(model).graph
    if graph.input[0].name == INPUT_NAME:
        return [rgb_pixels(image) for _, image in check_images()]
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    sizes = [batch.dim_value] if batch.dim_value else [1, 2]
    rng = np.random.default_rng(0)
    shape = (metadata.in_channels, *metadata.img_size)
    return [rng.standard_normal((n, *shape), dtype=np.float32) for n in sizes]


def validate_ort(
    ort_path: Path, model: Path, metadata: ExportMetadata, threads: int | None
) -> dict[str, object]:
    """Load ``ort_path`` and compare it with ``model`` at the export gates."""
    from coatnet_export.runtimes.onnxruntime import make_session
    from coatnet_export.validate import Gates, compare

    gates = Gates(max_rel_error=INT8_MAX_REL_ERROR) if ".int8." in model.name else Gates()
    ort_session, onnx_session = make_session(ort_path, threads), make_session(model, threads)
    name = onnx_session.get_inputs()[0].name
    results = []
    for inputs in check_inputs(model, metadata):
        reference = onnx_session.run(None, {name: inputs})[0]
        results.append(
            compare(ort_path.name, reference, ort_session.run(None, {name: inputs})[0], gates)
        )
    return {
        "max_rel": max(r.max_rel for r in results),
        "top1": min(r.top1 for r in results),
        "gate": gates.max_rel_error,
        "passed": all(r.passed for r in results),
    }


def usability(checker: ModuleType, model: Path) -> list[Usability]:
    """NNAPI and CoreML coverage of ``model``, as onnxruntime's mobile checker estimates it."""
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    providers = {
        "NNAPI": checker.check_nnapi_partitions,
        "CoreML": lambda m, fixed: checker.check_coreml_partitions(
            m, fixed, "coreml_supported_mlprogram_ops.md"
        ),
    }
    found = []
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        optimized = Path(tmp) / model.name
        optimize_model(model, optimized, use_external_initializers=True)
        proto = ModelProtoWithShapeInfo(optimized).model_with_shape_info
        for provider, check in providers.items():
            as_is, fixed = check(proto, True), check(proto, False)
            found.append(
                Usability(
                    provider, _coverage(as_is), _coverage(fixed), sorted(as_is.unsupported_ops)
                )
            )
    return found


def _coverage(info) -> Coverage:
    return Coverage(
        info.suitability().name, info.num_supported_nodes, info.num_nodes, info.num_partitions
    )


def build(request: PackageOptions) -> PackageOutcome:
    """Write DIR/ort: the .ort models, validated, and the reduced-build config."""
    export_dir = request.export_dir
    if request.output is not None:
        raise InputError(
            f"--target ort writes {export_dir / ORT_DIR}; --output is for the web and triton "
            "targets"
        )
    metadata = export_metadata(export_dir)
    converter, checker = load_tools()
    models = choose_models(export_dir, tuple(request.options.get("ort_models") or ()))
    for model in models.values():
        check_size(model)
    style = request.options.get("ort_style", "fixed")
    platform = request.options.get("ort_platform", "arm")
    threads = request.options.get("threads")
    final = export_dir / ORT_DIR
    result = PackageOutcome()
    with claim(final, request.force, models.values()) as claimed, staging(claimed) as stage:
        convert(converter, models, stage, style, platform)
        for model in models.values():
            row, notes = check_converted(
                stage / ort_name(model, style), model, metadata, checker, threads
            )
            result.table.append(row)
            result.notes += notes
        failed = [row["file"] for row in result.table if not row["passed"]]
        if failed:
            raise GateFailed(
                f"{', '.join(failed)} differ(s) from the .onnx beyond the export gates; "
                f"{final} was not written"
            )
        written = sorted(p.name for p in stage.iterdir())
        publish(stage, final)
    result.files = [final / name for name in written]
    record_artefacts(export_dir, _artefacts(written, models, style))
    if any(".int8." in model.name for model in models.values()):
        result.notes += int8_layout_notes(export_dir, "onnxruntime")
    result.notes.append(
        f"optimised for {platform} ({style} style); a reduced onnxruntime build takes "
        f"{final / _config_name(style)}"
    )
    return result


def check_converted(
    ort_path: Path,
    model: Path,
    metadata: ExportMetadata,
    checker: ModuleType,
    threads: int | None = None,
) -> tuple[dict[str, object], list[str]]:
    """A table row (parity and mobile usability) for one .ort, and notes on unsupported ops."""
    found = usability(checker, model)
    row = {
        "file": f"{ORT_DIR}/{ort_path.name}",
        "from": model.name,
        "bytes": ort_path.stat().st_size,
        **validate_ort(ort_path, model, metadata, threads),
        **{u.provider: u.summary() for u in found},
    }
    notes = [
        f"{model.name}: {u.provider} cannot run {', '.join(u.unsupported_ops)}"
        for u in found
        if u.unsupported_ops
    ]
    return row, notes


def _config_name(style: str) -> str:
    suffix = ".with_runtime_opt" if style == "runtime" else ""
    return f"required_operators_and_types{suffix}.config"


def _artefacts(
    written: list[str], models: dict[str, Path], style: str
) -> dict[str, tuple[str, str]]:
    sources = {ort_name(model, style): (kind, model.name) for kind, model in models.items()}
    artefacts = {}
    for name in written:
        if name in sources:
            kind, source = sources[name]
            artefacts[f"{ORT_DIR}/{name}"] = (
                f"ort {kind}",
                f"{source} in the ORT format, for onnxruntime mobile and minimal builds",
            )
        elif name.endswith(".config"):
            artefacts[f"{ORT_DIR}/{name}"] = ("ort config", CONFIG_PURPOSE)
    return artefacts
