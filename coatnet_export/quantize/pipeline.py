"""int8 quantization of an export for CPU inference, on top of onnxruntime.quantization.

One page of named steps: check the options and the model -> resolve the plan (types for the
target CPU, recipe, gate) -> gather the inputs -> in a hidden work folder: prepare, calibrate
in bounded memory, fp32 logits, quantize until the gate passes (fallback.py), measure, time
-> write model.int8.onnx, quantization.json and the manifest, renamed into place together.

The work folder (``.quantize-*`` in the export folder) is removed whatever happens; its files
keep their weights in external data, so no step holds more than one copy of the fp32 weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from coatnet_export.console import Progress
from coatnet_export.errors import writing
from coatnet_export.layout import INT8_FILE
from coatnet_export.quantize.calibrate import SessionPlan, calibrate_ranges
from coatnet_export.quantize.evaluate import Agreement, agreement, latency, logits, lowest_sqnr
from coatnet_export.quantize.fallback import (
    SQNR_SAMPLES,
    Attempt,
    Fallback,
    quantize_until_gate,
)
from coatnet_export.quantize.graph import prepare
from coatnet_export.quantize.options import QuantOptions, QuantPlan, check_options, resolve
from coatnet_export.quantize.outputs import publish_outputs, workspace, write_outputs
from coatnet_export.quantize.report import Measurements, QuantOutcome, QuantReport
from coatnet_export.quantize.source import Data, Sessions, Source, check_source, gather_data


def run_quantize(options: QuantOptions, progress: Progress) -> QuantOutcome:
    """Quantize the fp32 export ``options.model``; writes ``model.int8.onnx`` and a report
    beside it (also when the gate fails: the outcome says so)."""
    check_options(options)
    if options.model is None:
        raise ValueError("QuantOptions.model names no export to quantize")
    source = check_source(options.model, options.preprocessing)
    plan = resolve(options, source.metadata)
    data = gather_data(source, options)
    announce(plan, progress)
    with workspace(source.folder) as work, writing(source.folder, "model folder"):
        report, final = measure(work, source, plan, data, progress)
        with progress.step(f"writing {INT8_FILE}"):
            write_outputs(work, source, final, report)
        publish_outputs(work, source.folder, report)
    return QuantOutcome(source.folder / INT8_FILE, report)


def announce(plan: QuantPlan, progress: Progress) -> None:
    """The steps to come, and what was chosen for the target."""
    static, exact = plan.static, plan.judgement.exact
    progress.expect(5 + 2 * static + exact)
    progress.note(plan.choice.describe())
    progress.note(f"gate: {plan.gate.label} >= {plan.gate.threshold} ({plan.gate.reason})")
    progress.note(f"gate measured on {plan.judgement.label}: {plan.judgement.reason}")


def measure(
    work: Path, source: Source, plan: QuantPlan, data: Data, progress: Progress
) -> tuple[QuantReport, Attempt]:
    """Every heavy step, in ``work``: the report and the final quantization."""
    opts = plan.options
    sessions = source.sessions(opts.threads, opts.runtime)
    pre = prepare_model(work, source, plan, sessions, progress)
    cache = calibrate_model(pre, data, plan, sessions, progress)
    with progress.step(f"fp32 logits on {len(data.evaluation)} held-out inputs"):
        reference = logits(source.model_path, data.evaluation, sessions.batched)
    tried = quantize_until_gate(
        pre, work, plan, cache, data.evaluation, reference, sessions, progress
    )
    native = native_agreement(tried, plan, data, reference, sessions, progress)
    worst = lowest_activations(pre, tried, plan, data, sessions, progress)
    timings, timed = time_models(source, tried, plan, sessions, progress)
    measured = Measurements(data, tried, timings, worst, timed, native)
    return QuantReport.build(plan, measured), tried.final


def prepare_model(
    work: Path, source: Source, plan: QuantPlan, sessions: Sessions, progress: Progress
) -> Path:
    """The fp32 model optimised and shape-inferred for the quantizer (graph.prepare)."""
    pre = work / "pre.onnx"
    split = plan.recipe is not None and plan.recipe.split_attention
    with progress.step("preparing the fp32 model (onnxruntime basic optimisation, shapes)"):
        prepare(source.model_path, pre, sessions.one.low_memory, split)
    return pre


def calibrate_model(
    pre: Path, data: Data, plan: QuantPlan, sessions: Sessions, progress: Progress
) -> Path | None:
    """The calibration cache of static quantization (None for dynamic)."""
    if data.calibration is None:
        return None
    count, method = len(data.calibration), plan.options.method
    label = f"calibrating ({method}) on {count} inputs, {sessions.one.batch} per run"
    with progress.step(label):
        return calibrate_ranges(
            pre,
            data.calibration,
            plan.recipe.op_types if plan.recipe else None,
            method,
            sessions.one,
            progress.counter("calibrated", count),
        )


def native_agreement(
    tried: Fallback,
    plan: QuantPlan,
    data: Data,
    reference: np.ndarray,
    sessions: Sessions,
    progress: Progress,
) -> Agreement | None:
    """Where the gate measured the exact arithmetic: the agreement on this machine's kernels."""
    if not plan.judgement.exact:
        return None
    with progress.step(f"int8 logits on this machine's kernels ({plan.options.runtime})"):
        int8 = logits(tried.final.path, data.evaluation, sessions.batched)
    return agreement(reference, int8, data.evaluation.targets)


def lowest_activations(
    pre: Path,
    tried: Fallback,
    plan: QuantPlan,
    data: Data,
    sessions: Sessions,
    progress: Progress,
) -> list[tuple[str, float]]:
    """The activations int8 keeps worst (static quantization), for the report."""
    if not plan.static:
        return []
    inputs = data.evaluation.take(SQNR_SAMPLES)
    with progress.step(f"per-activation SQNR on {len(inputs)} inputs"):
        return lowest_sqnr(pre, tried.final.path, inputs, sessions.one)


def time_models(
    source: Source, tried: Fallback, plan: QuantPlan, sessions: Sessions, progress: Progress
) -> tuple[dict[str, float], SessionPlan]:
    """Median latency of fp32, int8 and (after a fallback) int8 before it, in the runtime."""
    timed = {"fp32": source.model_path, "int8": tried.final.path}
    if tried.steps:
        timed["int8 before fallback"] = tried.first.path
    runs, how = plan.options.latency_runs, replace(sessions.one, runtime=plan.options.runtime)
    with progress.step(f"timing {', '.join(timed)} ({runs} runs each, batch {how.batch})"):
        timings = latency(timed, source.input_shape, how, runs)
    return timings, how
