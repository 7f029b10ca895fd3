"""Quantizing once (onnxruntime, static QDQ or dynamic), and the fallback loop: while the gate
fails, return the nodes behind the lowest-SQNR activations to float and quantize again."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

from coatnet_export.console import Progress, quiet_libraries
from coatnet_export.quantize.calibrate import METHODS, Inputs, SessionPlan
from coatnet_export.quantize.evaluate import Agreement, agreement, logits, lowest_sqnr
from coatnet_export.quantize.graph import (
    DYNAMIC_OPS,
    compact_biases,
    float_into_float_readers,
    nodes_to_float,
)
from coatnet_export.quantize.options import QuantPlan
from coatnet_export.quantize.presets import QuantChoice
from coatnet_export.quantize.recipes import Recipe
from coatnet_export.quantize.source import Sessions

TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
SQNR_SAMPLES = 8
"""Held-out inputs the per-tensor SQNR is measured on."""


@dataclass(frozen=True)
class Attempt:
    """One quantization of the prepared model, and how it compares with fp32."""

    path: Path
    excluded: list[str]
    result: Agreement


@dataclass(frozen=True)
class Fallback:
    """Every attempt of the fallback loop, the nodes each step returned to float, and the
    bytes the bias compaction saved."""

    attempts: list[Attempt]
    steps: list[list[str]]
    compact_bytes: int

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]

    @property
    def first(self) -> Attempt:
        return self.attempts[0]


def quantize_once(
    pre: Path,
    out: Path,
    choice: QuantChoice,
    recipe: Recipe | None,
    cache: Path | None,
    exclude: list[str],
    per_channel: bool = True,
    method: str = "minmax",
) -> int:
    """One onnxruntime quantization of the prepared model ``pre`` (static with ``recipe``'s op
    types, dynamic when it is None), its baked biases compacted, into ``out`` with its weights
    in ``out.data``; returns the bytes the compaction saved."""
    raw = out.with_name(f"raw-{out.name}")
    with quiet_libraries():
        if recipe is None:
            quantize_dynamic(
                str(pre),
                str(raw),
                op_types_to_quantize=list(DYNAMIC_OPS),
                per_channel=per_channel,
                reduce_range=choice.reduce_range,
                weight_type=TYPES[choice.weight_type],
                nodes_to_exclude=exclude,
                use_external_data_format=True,
            )
        else:
            quantize_static(
                str(pre),
                str(raw),
                None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=None if recipe.op_types is None else list(recipe.op_types),
                per_channel=per_channel,
                reduce_range=choice.reduce_range,
                activation_type=TYPES[choice.activation_type],
                weight_type=TYPES[choice.weight_type],
                nodes_to_exclude=exclude,
                calibrate_method=METHODS[method],
                calibration_cache_path=cache,
                use_external_data_format=True,
                extra_options={
                    "ActivationSymmetric": False,
                    "WeightSymmetric": True,
                    **recipe.extra_options(),
                },
            )
    model = onnx.load(str(raw))
    for path in (raw, raw.with_name(f"{raw.name}.data")):
        path.unlink(missing_ok=True)
    float_into_float_readers(model)
    saved = compact_biases(model)
    save_model(model, out, external=True)
    return saved


def save_model(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Write ``model`` to ``path``, its weights in ``path.data`` when ``external``."""
    if not external:
        onnx.save_model(model, str(path))
        return
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=1024,
        convert_attribute=False,
    )


def fallback_step(
    pre: Path, attempt: Attempt, evaluation: Inputs, plan: SessionPlan, per_step: int
) -> list[str]:
    """The nodes to return to float next, about ``per_step`` of them: those that read the
    activations with the lowest SQNR in int8 (or the closest quantized node upstream)."""
    worst = lowest_sqnr(pre, attempt.path, evaluation.take(SQNR_SAMPLES), plan, count=20)
    proto = onnx.load(str(pre), load_external_data=False)
    excluded, step = set(attempt.excluded), []
    for tensor, _ in worst:
        nodes = nodes_to_float(tensor, proto, excluded)
        step += nodes
        excluded.update(nodes)
        if len(step) >= per_step:
            break
    return step


def quantize_until_gate(
    pre: Path,
    work: Path,
    plan: QuantPlan,
    cache: Path | None,
    evaluation: Inputs,
    reference: np.ndarray,
    sessions: Sessions,
    progress: Progress,
) -> Fallback:
    """Quantize, compare with fp32, and while the gate fails (static mode), return the nodes
    behind the worst activations to float and quantize again, up to the allowed steps."""
    opts, gate = plan.options, plan.gate
    batched = sessions.batched
    if gate.exact:  # as the target computes (presets.judge), whatever --runtime
        batched = replace(batched, runtime="onnxruntime", unfused=True)
    exclude = []
    if plan.recipe is not None:
        exclude = plan.recipe.exclusions(onnx.load(str(pre), load_external_data=False))
    attempts: list[Attempt] = []
    steps: list[list[str]] = []
    while True:
        path = work / f"int8-{len(attempts)}.onnx"
        step_note = f", fallback step {len(steps)}" if steps else ""
        with progress.step(f"quantizing ({opts.mode}{step_note})"):
            compact = quantize_once(
                pre, path, plan.choice, plan.recipe, cache, exclude, opts.per_channel, opts.method
            )
            int8 = logits(path, evaluation, batched)
        result = agreement(reference, int8, evaluation.targets)
        attempts.append(Attempt(path, list(exclude), result))
        progress.note(f"gate: {gate.describe(result)}")
        if gate.passed(result) or not plan.static or len(steps) >= opts.max_fallback_steps:
            return Fallback(attempts, steps, compact)
        progress.expect(progress.total + 2)
        with progress.step("measuring per-activation SQNR to choose nodes for float"):
            step = fallback_step(
                pre, attempts[-1], evaluation, sessions.one, opts.fallback_per_step
            )
        if not step:
            return Fallback(attempts, steps, compact)
        progress.note(f"returning to float: {', '.join(step)}")
        steps.append(step)
        exclude = exclude + step
