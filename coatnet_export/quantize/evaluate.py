"""How an int8 model compares with its fp32 model: agreement of the logits, the gate, per-tensor
SQNR and latency. Every pass streams its inputs in batches and keeps only logits or sums."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from coatnet_export.bench import time_interleaved
from coatnet_export.metadata import ExportMetadata
from coatnet_export.quantize.calibrate import (
    Inputs,
    SessionPlan,
    augmented_session,
    with_nodes_after_producers,
)
from coatnet_export.runtimes import RunOptions, load_model

"""What ``--gate`` accepts."""


@dataclass
class Agreement:
    """How the int8 model's logits compare with fp32's on held-out inputs."""

    samples: int
    top1: float
    top5: float
    min_cosine: float
    mean_cosine: float
    logits_sqnr_db: float
    """10 log10(sum fp32^2 / sum (fp32 - int8)^2) over every logit."""
    max_abs: float
    fp32_accuracy: float | None = None
    int8_accuracy: float | None = None


def agreement(fp32: np.ndarray, int8: np.ndarray, targets: list[int | None]) -> Agreement:
    """Agreement of two (samples, classes) logit arrays; accuracy where targets are known."""
    a, b = fp32.astype(np.float64), int8.astype(np.float64)
    k = min(5, a.shape[1])
    top_a, top_b = np.argsort(-a, 1)[:, :k], np.argsort(-b, 1)[:, :k]
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / np.maximum(norms, 1e-30)
    noise = max(float(((a - b) ** 2).sum()), 1e-30)
    labelled = [(i, t) for i, t in enumerate(targets) if t is not None]

    def accuracy(top: np.ndarray) -> float | None:
        return float(np.mean([top[i, 0] == t for i, t in labelled])) if labelled else None

    return Agreement(
        len(a),
        float((top_a[:, 0] == top_b[:, 0]).mean()),
        float(np.mean([set(x) == set(y) for x, y in zip(top_a, top_b, strict=True)])),
        float(cos.min()),
        float(cos.mean()),
        float(10 * np.log10(max(float((a**2).sum()), 1e-30) / noise)),
        float(np.abs(a - b).max()),
        accuracy(top_a),
        accuracy(top_b),
    )


def logits(path: Path, inputs: Inputs, plan: SessionPlan) -> np.ndarray:
    """The first output of ``path`` for every input, batch by batch: (samples, classes)."""
    options = RunOptions(plan.threads, low_memory=plan.low_memory, unfused=plan.unfused)
    model = load_model(path, plan.runtime, options)
    out = [
        model.run(batch)[:count] for batch, count in inputs.batches(plan.batch, plan.fixed_batch)
    ]
    return np.concatenate(out)


@dataclass(frozen=True)
class Gate:
    """What the int8 model must reach against fp32 to pass."""

    metric: str
    """``top1`` (top-1 agreement) or ``cosine`` (the smallest cosine similarity of the logits)."""
    threshold: float
    reason: str
    exact: bool = False
    """Measured on the exact integer arithmetic (QDQ unfused) rather than this machine's
    kernels (quantize/presets.judge)."""

    @property
    def label(self) -> str:
        return "top-1 agreement" if self.metric == "top1" else "smallest cosine similarity"

    def value(self, result: Agreement) -> float:
        return result.top1 if self.metric == "top1" else result.min_cosine

    def passed(self, result: Agreement) -> bool:
        return self.value(result) >= self.threshold

    def describe(self, result: Agreement) -> str:
        verdict = ">=" if self.passed(result) else "<"
        return f"{self.label} {self.value(result):.4f} {verdict} {self.threshold}"


def choose_gate(
    requested: str, metadata: ExportMetadata | None, min_top1: float, min_cosine: float
) -> Gate:
    """``--gate``: top-1 agreement for trained weights, the cosine similarity of the logits for
    seeded ones (``auto`` decides from the model's metadata)."""
    seed = metadata.seed if metadata is not None else None
    seeded = seed is not None
    if requested == "top1" or (requested == "auto" and not seeded):
        why = (
            "asked for with --gate top1"
            if requested == "top1"
            else (
                "trained weights: the classes int8 picks must be fp32's"
                if metadata is not None
                else "a model without coatnet-export metadata, taken as trained"
            )
        )
        return Gate("top1", min_top1, why)
    why = (
        "asked for with --gate cosine"
        if requested == "cosine"
        else (
            f"seeded weights (seed {seed}): untrained logits have tiny top-1 margins, so "
            "top-1 agreement measures noise; the cosine similarity of the logits measures the "
            "quantization error"
        )
    )
    return Gate("cosine", min_cosine, why)


def latency(
    models: dict[str, Path],
    input_shape: tuple[int, ...],
    plan: SessionPlan,
    runs: int,
) -> dict[str, float]:
    """Median milliseconds per run of each named model on a batch of ``plan.batch``, all timed
    interleaved, in sessions as deployed (onnxruntime's spinning threads, see
    bench.model_target); for a low-memory plan one model after another, so that only one
    model's weights are held."""
    x = np.random.default_rng(0).standard_normal((plan.batch, *input_shape), dtype=np.float32)
    options = RunOptions(plan.threads, low_memory=plan.low_memory)
    groups = [[name] for name in models] if plan.low_memory else [list(models)]
    medians = {}
    for group in groups:
        loaded = {name: load_model(models[name], plan.runtime, options) for name in group}
        runners = {k: functools.partial(m.run, x) for k, m in loaded.items()}
        samples = time_interleaved(runners, warmup=3, runs=runs)
        del loaded
        medians.update({k: float(np.median(v) * 1000) for k, v in samples.items()})
    return medians


def activation_quantizers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Activation -> the QuantizeLinear node that quantizes it, in a QDQ model."""
    constants = {t.name for t in proto.graph.initializer}
    quantizers: dict[str, onnx.NodeProto] = {}
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants:
            quantizers.setdefault(node.input[0], node)
    return quantizers


def augment_errors(
    fp32: onnx.ModelProto, int8: onnx.ModelProto
) -> tuple[onnx.ModelProto, list[str]]:
    """``fp32`` (graph only) that outputs, for each activation ``int8`` quantizes, sum(x^2) and
    sum((x - dequantize(quantize(x)))^2) with int8's scale and zero point, computed right
    after x is made. Only scalars leave the session, and only the fp32 weights are held (the
    int8 graph with error outputs would keep onnxruntime from fusing its QDQ nodes and hold
    a float copy of every weight). Returns the model and the activations' names."""
    int8_constants = {t.name: t for t in int8.graph.initializer}
    known = {o for n in fp32.graph.node for o in n.output} | {i.name for i in fp32.graph.input}
    quantizers = {k: q for k, q in activation_quantizers(int8).items() if k in known}
    tensors = list(quantizers)
    added, constants = {}, []
    for i, name in enumerate(tensors):
        scale, zero = (f"sqnr/{i}/scale", f"sqnr/{i}/zero_point")
        for source, target in zip(quantizers[name].input[1:3], (scale, zero), strict=True):
            constants.append(
                numpy_helper.from_array(numpy_helper.to_array(int8_constants[source]), target)
            )
        p = f"sqnr/{i}/"
        added[name] = [
            helper.make_node("QuantizeLinear", [name, scale, zero], [p + "q"]),
            helper.make_node("DequantizeLinear", [p + "q", scale, zero], [p + "dq"]),
            helper.make_node("Sub", [name, p + "dq"], [p + "diff"]),
            helper.make_node("ReduceSumSquare", [p + "diff"], [p + "noise"], keepdims=0),
            helper.make_node("ReduceSumSquare", [name], [p + "signal"], keepdims=0),
        ]
    augmented = with_nodes_after_producers(fp32, added)
    augmented.graph.initializer.extend(constants)
    augmented.graph.output.extend(
        helper.make_tensor_value_info(f"sqnr/{i}/{kind}", onnx.TensorProto.FLOAT, [])
        for i in range(len(tensors))
        for kind in ("signal", "noise")
    )
    return augmented, tensors


def lowest_sqnr(
    pre: Path,
    int8_path: Path,
    inputs: Inputs,
    plan: SessionPlan,
    count: int = 10,
) -> list[tuple[str, float]]:
    """The activations that lose most in int8: SQNR in dB of each activation the int8 model
    quantizes against its quantize-dequantize round trip (the int8 model's scale and zero
    point) in the prepared fp32 model ``pre``, summed over ``inputs``, lowest first."""
    path = pre.with_name(f"sqnr-{pre.name}")  # beside pre: it reads pre's weights file
    augmented, tensors = augment_errors(
        onnx.load(str(pre), load_external_data=False),
        onnx.load(str(int8_path), load_external_data=False),
    )
    onnx.save(augmented, str(path))
    session = augmented_session(path, plan, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    name = session.get_inputs()[0].name
    outputs = [f"sqnr/{i}/{kind}" for i in range(len(tensors)) for kind in ("signal", "noise")]
    sums = np.zeros(len(outputs), dtype=np.float64)
    for batch, _ in inputs.batches(plan.batch, plan.fixed_batch):
        sums += np.asarray(session.run(outputs, {name: batch}), dtype=np.float64)
    del session
    path.unlink()
    signal, noise = sums[0::2], sums[1::2]
    scores = 10 * np.log10(np.maximum(signal, 1e-30) / np.maximum(noise, 1e-30))
    ranked = sorted(zip(tensors, scores.tolist(), strict=True), key=lambda item: item[1])
    return [(t, s) for t, s in ranked if np.isfinite(s)][:count]
