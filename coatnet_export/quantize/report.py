"""What a quantization did and measured: quantization.json, the model's metadata, the table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from coatnet_export.quantize.calibrate import SessionPlan
from coatnet_export.quantize.evaluate import Agreement
from coatnet_export.quantize.fallback import Fallback
from coatnet_export.quantize.graph import DYNAMIC_OPS
from coatnet_export.quantize.options import QuantPlan
from coatnet_export.quantize.presets import QuantChoice
from coatnet_export.quantize.source import Data


@dataclass(frozen=True)
class Measurements:
    """What the heavy steps of a quantization measured."""

    data: Data
    fallback: Fallback
    timings: dict[str, float]
    """Median ms of fp32, int8 and, after a fallback, int8 before it."""
    worst: list[tuple[str, float]]
    """The lowest-SQNR activations of the final model (static), in dB."""
    timed: SessionPlan
    """How the models were timed."""
    native: Agreement | None
    """The agreement on this machine's own kernels when the gate measured exact arithmetic."""


@dataclass
class QuantReport:
    """Everything quantization.json records."""

    mode: str
    quantized_ops: list[str]
    """The recipe's op types (static; empty: onnxruntime's default set) or those of dynamic
    quantization."""
    choice: QuantChoice
    calibration: str
    calibration_method: str | None
    gate: dict
    """metric, threshold, reason, value."""
    excluded_nodes: list[str]
    fallback_steps: list[list[str]]
    agreement: Agreement
    agreement_before_fallback: Agreement | None
    latency_ms: dict[str, float]
    """Median batch-1 ms of fp32, int8 and, after a fallback, int8 before it."""
    speedup: float
    speedup_before_fallback: float | None
    lowest_sqnr: list[dict[str, float | str]]
    compact_bias_bytes: int
    low_memory_sessions: bool
    passed: bool
    sizes: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runtime: str = "onnxruntime"
    """The runtime the int8 graph is laid out for, where the agreement and the latency were
    measured."""
    recipe: str | None = None
    """The name of the static recipe (graph.Recipe), None for dynamic quantization."""
    laid_out_for: str = "onnxruntime"
    """The runtime whose kernels the graph is laid out for: the static recipe's; dynamic
    quantization writes onnxruntime's integer operators whatever it is measured in."""
    judgement: dict = field(default_factory=dict)
    """How the agreement (the gate) was measured: ``measured``, ``exact``, ``reason``
    (quantize/presets.judge)."""
    native_agreement: Agreement | None = None
    """When the gate measured the exact arithmetic: the agreement on this machine's own
    kernels, which differ from the target's."""

    @classmethod
    def build(cls, plan: QuantPlan, measured: Measurements) -> QuantReport:
        """The report of a quantization planned as ``plan`` that measured ``measured``."""
        opts, choice, gate, recipe = plan.options, plan.choice, plan.gate, plan.recipe
        tried, timings = measured.fallback, measured.timings
        before = timings.get("int8 before fallback")
        return cls(
            mode=opts.mode,
            quantized_ops=list((recipe.op_types or ()) if recipe else DYNAMIC_OPS),
            choice=choice,
            calibration=measured.data.calibration_source,
            calibration_method=opts.method if recipe else None,
            gate={
                "metric": gate.metric,
                "threshold": gate.threshold,
                "reason": gate.reason,
                "value": gate.value(tried.final.result),
            },
            excluded_nodes=tried.final.excluded,
            fallback_steps=tried.steps,
            agreement=tried.final.result,
            agreement_before_fallback=tried.first.result if tried.steps else None,
            latency_ms=timings,
            speedup=timings["fp32"] / timings["int8"],
            speedup_before_fallback=timings["fp32"] / before if before else None,
            lowest_sqnr=[{"tensor": t, "sqnr_db": s} for t, s in measured.worst],
            compact_bias_bytes=tried.compact_bytes,
            low_memory_sessions=measured.timed.low_memory,
            passed=gate.passed(tried.final.result),
            notes=measured.data.notes + notes(plan, measured),
            runtime=measured.timed.runtime,
            recipe=recipe.name if recipe else None,
            laid_out_for=recipe.runtime if recipe else "onnxruntime",
            judgement={
                "measured": plan.judgement.label,
                "exact": plan.judgement.exact,
                "reason": plan.judgement.reason,
            },
            native_agreement=measured.native,
        )

    def as_dict(self) -> dict:
        return asdict(self)

    def summary_rows(self) -> list[dict[str, object]]:
        """The metric/value table ``coatnet-export quantize`` prints."""
        a = self.agreement
        rows = [
            ("target CPU", self.choice.target_cpu),
            (
                "types",
                f"{self.choice.activation_type} x {self.choice.weight_type}, reduce_range "
                f"{self.choice.reduce_range}",
            ),
            ("gate", f"{self.gate['metric']} >= {self.gate['threshold']}"),
            ("for and timed in", self.runtime),
            ("gate measured on", self.judgement.get("measured")),
            ("top-1 agreement", a.top1),
            ("top-5 agreement", a.top5),
            ("min / mean cosine", f"{a.min_cosine:.5f} / {a.mean_cosine:.5f}"),
            ("logits SQNR (dB)", f"{a.logits_sqnr_db:.1f}"),
            ("max abs error", a.max_abs),
            ("fp32 accuracy", a.fp32_accuracy),
            ("int8 accuracy", a.int8_accuracy),
            (
                "fp32 / int8 size (MiB)",
                f"{self.sizes['fp32'] / 2**20:.1f} / {self.sizes['int8'] / 2**20:.1f} "
                f"({100 * self.sizes['int8'] / self.sizes['fp32']:.1f} %)",
            ),
            (
                "fp32 / int8 p50 latency (ms)",
                f"{self.latency_ms['fp32']:.2f} / {self.latency_ms['int8']:.2f} "
                f"(x{self.speedup:.2f})",
            ),
        ]
        if self.speedup_before_fallback is not None:
            rows.append(
                (
                    "int8 before fallback (ms)",
                    f"{self.latency_ms['int8 before fallback']:.2f} "
                    f"(x{self.speedup_before_fallback:.2f})",
                )
            )
        if self.native_agreement is not None:
            native = self.native_agreement
            rows.append(
                (
                    "on this machine's kernels",
                    f"top-1 {native.top1:.4f}, min cosine {native.min_cosine:.5f}",
                )
            )
        rows += [
            ("nodes kept in float", len(self.excluded_nodes)),
            ("fallback steps", len(self.fallback_steps)),
        ]
        return [{"metric": k, "value": v} for k, v in rows if v is not None]


def notes(plan: QuantPlan, measured: Measurements) -> list[str]:
    """What a reader of the report should know: a fallback that cost speed, low-memory
    timing, the recipe's provenance, a faster runtime for the target."""
    choice, recipe, timed, timings = plan.choice, plan.recipe, measured.timed, measured.timings
    found = []
    before = timings.get("int8 before fallback")
    if before is not None and timings["int8"] > before:
        found.append(
            f"the fallback made the int8 model slower: x{timings['fp32'] / timings['int8']:.2f} "
            f"over fp32 after it, x{timings['fp32'] / before:.2f} before (its float nodes need "
            "extra quantize/dequantize steps)"
        )
    if timed.low_memory:
        found.append(
            "large model: timed one model after the other (not interleaved), in "
            "low-memory sessions (no weight pre-packing), slower than deployment with "
            "default sessions"
        )
    if recipe is not None and choice.recipes.get(timed.runtime) == recipe.key:
        found.append(
            f"recipe {recipe.key}: the fastest for {choice.target_cpu} in {timed.runtime} "
            f"({choice.measured})"
        )
    if choice.fastest_runtime != timed.runtime:
        found.append(
            f"the fastest int8 runtime measured on {choice.target_cpu} is "
            f"{choice.fastest_runtime} ({choice.measured}); this model is for "
            f"{timed.runtime} (quantize --runtime {choice.fastest_runtime} lays it out for "
            "the other)"
        )
    return found


@dataclass(frozen=True)
class QuantOutcome:
    """What ``run_quantize`` made: the int8 model (written even when the gate failed, for
    inspection) and its report."""

    model: Path
    report: QuantReport

    @property
    def passed(self) -> bool:
        return self.report.passed

    def rows(self) -> list[dict[str, object]]:
        return self.report.summary_rows()

    def as_dict(self) -> dict:
        return {"model": str(self.model), **self.report.as_dict()}


def metadata_quantization(report: QuantReport) -> dict:
    """The summary of a quantization recorded in the int8 model and the manifest: what
    ``info`` and scripts/infer.py compare with the CPU they run on."""
    return {
        "mode": report.mode,
        "laid_out_for": report.laid_out_for,
        "recipe": report.recipe,
        "quantized_ops": report.quantized_ops,
        "target_cpu": report.choice.target_cpu,
        "activation_type": report.choice.activation_type,
        "weight_type": report.choice.weight_type,
        "reduce_range": report.choice.reduce_range,
        "reason": report.choice.reason,
        "detected_cpu": report.choice.detected,
        "overrides": report.choice.overrides,
        "calibration": report.calibration,
        "excluded_nodes": report.excluded_nodes,
        "gate": report.gate,
        "gate_measured_on": report.judgement.get("measured"),
        "top1_agreement": report.agreement.top1,
        "min_cosine": report.agreement.min_cosine,
    }
