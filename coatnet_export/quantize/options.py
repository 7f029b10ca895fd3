"""What a quantization is asked to do (:class:`QuantOptions`), checked before any heavy work,
and what it will do once resolved against the model (:class:`QuantPlan`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from coatnet_export.errors import InputError
from coatnet_export.metadata import ExportMetadata
from coatnet_export.preprocess import Preprocessing
from coatnet_export.quantize.evaluate import Gate, choose_gate
from coatnet_export.quantize.presets import Judgement, QuantChoice, choose_types, judge
from coatnet_export.quantize.recipes import RECIPES, RUNTIME_RECIPES, Recipe
from coatnet_export.runtimes import check_runtime


@dataclass(frozen=True, kw_only=True)
class QuantOptions:
    """What ``coatnet-export quantize`` (or ``export --quantize``) was asked to do."""

    model: Path | None = None
    """The export folder or its model.onnx (``export --quantize`` names it after exporting)."""
    preprocessing: Preprocessing | None = None
    """For a model without coatnet-export metadata (``--img-size``, ``--mean``, ``--std``)."""
    mode: str = "static"
    calibration_data: Path | None = None
    random_calibration: bool = False
    samples: int = 64
    method: str = "minmax"
    eval_data: Path | None = None
    eval_samples: int = 1000
    target_cpu: str = "auto"
    activation_type: str | None = None
    weight_type: str | None = None
    reduce_range: bool | None = None
    per_channel: bool = True
    gate: str = "auto"
    min_top1: float = 0.99
    min_cosine: float = 0.99
    max_fallback_steps: int = 4
    fallback_per_step: int = 3
    threads: int | None = None
    latency_runs: int = 20
    runtime: str = "onnxruntime"
    """The runtime the int8 model is for (onnxruntime or openvino): its graph is laid out for
    that runtime's kernels (recipes.RUNTIME_RECIPES), and the report's agreement and latency
    are measured there."""
    recipe: str | None = None
    """``--recipe``: a static recipe of recipes.RECIPES; None takes the target CPU's fastest in
    :attr:`runtime` (presets.CpuPreset.recipes)."""
    seed: int = 0
    dynamic_hint: str = "--mode dynamic"
    """How the command that runs this spells dynamic quantization (for error messages)."""


@dataclass(frozen=True)
class QuantPlan:
    """The options resolved once, against the model: the types, the recipe, the gate."""

    options: QuantOptions
    choice: QuantChoice
    recipe: Recipe | None
    """The static recipe; None for dynamic quantization."""
    gate: Gate
    judgement: Judgement

    @property
    def static(self) -> bool:
        return self.recipe is not None


def check_options(opts: QuantOptions) -> None:
    """What can be checked before the model exists (``export --quantize`` checks it before
    exporting): a calibration source for static quantization, folders that are folders, the
    runtime installed."""
    check_runtime(opts.runtime)
    if opts.recipe is not None and opts.recipe not in RECIPES:
        raise InputError(f"unknown recipe {opts.recipe!r} (choose one of {', '.join(RECIPES)})")
    if opts.recipe is not None and opts.mode != "static":
        raise InputError("--recipe is for static quantization (drop it, or use --mode static)")
    if opts.mode == "static" and opts.calibration_data is None and not opts.random_calibration:
        raise InputError(
            "static quantization needs --calibration-data DIR (images preprocessed like "
            "inference); or --random-calibration, which costs accuracy, or "
            f"{opts.dynamic_hint}"
        )
    for option, folder in (
        ("--calibration-data", opts.calibration_data),
        ("--eval-data", opts.eval_data),
    ):
        if folder is not None and not folder.is_dir():
            raise InputError(f"{option} {folder} is not a directory of images")


def resolve(opts: QuantOptions, metadata: ExportMetadata | None) -> QuantPlan:
    """The types for the target CPU, the static recipe (the target's fastest in the runtime
    unless ``--recipe``), the gate and how this machine measures it."""
    choice = choose_types(
        opts.target_cpu, opts.activation_type, opts.weight_type, opts.reduce_range
    )
    if opts.mode == "dynamic" and choice.activation_type != "uint8":
        choice = replace(
            choice,
            activation_type="uint8",
            reason=f"{choice.reason}; dynamic quantization computes u8 activations whatever "
            "the target",
        )
    recipe = None
    if opts.mode == "static":
        key = opts.recipe or choice.recipes.get(opts.runtime)
        recipe = RECIPES[key] if key else RUNTIME_RECIPES[opts.runtime]
    judgement = judge(choice)
    gate = choose_gate(opts.gate, metadata, opts.min_top1, opts.min_cosine)
    return QuantPlan(opts, choice, recipe, replace(gate, exact=judgement.exact), judgement)
