"""Calibration in bounded memory: stream the inputs in small batches, keep running statistics.

onnxruntime's calibrators keep the activations of every calibration input until the end
(MinMax: one set of reductions per input; Entropy/Percentile: every full activation tensor).
Here the model is augmented once, the inputs flow through it a batch at a time, and only
per-tensor statistics are kept: a running min/max (computed in the graph by ReduceMin and
ReduceMax, so a batch returns two scalars per tensor) or a histogram merged batch by batch
(onnxruntime's :class:`HistogramCollector`, which re-bins as the range grows, with its bin count
capped here). The ranges go to onnxruntime's quantizer as its calibration cache, so the graph
rewriting stays onnxruntime's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxruntime.quantization.calibrate import (
    CalibrationMethod,
    HistogramCollector,
    TensorsData,
    save_tensors_data,
)

from coatnet_export.console import quiet_libraries
from coatnet_export.errors import InputError
from coatnet_export.preprocess import Preprocessing, list_images, load_images

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
HISTOGRAM_SETTINGS = {
    "entropy": {"num_bins": 128, "num_quantized_bins": 128, "percentile": 99.999},
    "percentile": {"num_bins": 2048, "num_quantized_bins": 128, "percentile": 99.999},
}
"""onnxruntime's defaults for its Entropy and Percentile calibrators."""
MAX_BIN_FACTOR = 16
"""A histogram that grows past this many times its initial bins is coarsened by two."""
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)
OUTPUT_BUDGET_BYTES = 256 * 2**20
"""Activations fetched from one run of the augmented model (histogram methods)."""


@dataclass
class Inputs:
    """Model inputs, streamed in batches: preprocessed images, or seeded random noise."""

    preprocessing: Preprocessing
    paths: list[Path] = field(default_factory=list)
    targets: list[int | None] = field(default_factory=list)
    """Class index of each image (its folder names a label), or None."""
    random: int = 0
    """How many random inputs, when there are no paths."""
    seed: int = 0

    def __len__(self) -> int:
        return len(self.paths) or self.random

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.preprocessing.channels, *self.preprocessing.size)

    def take(self, count: int) -> Inputs:
        """The first ``count`` inputs."""
        return Inputs(
            self.preprocessing,
            self.paths[:count],
            self.targets[:count],
            min(self.random, count),
            self.seed,
        )

    def arrays(self) -> Iterator[np.ndarray]:
        """One (C, H, W) array at a time."""
        if not self.paths:
            rng = np.random.default_rng(self.seed)
            for _ in range(self.random):
                yield rng.standard_normal(self.shape, dtype=np.float32)
            return
        for _, array, _ in load_images(self.paths, self.preprocessing):
            if array is not None:  # decoded once already; a file changed since is skipped
                yield array

    def batches(self, size: int, fixed: bool = False) -> Iterator[tuple[np.ndarray, int]]:
        """(batch, how many real inputs it holds); a ``fixed`` size pads the last batch by
        repeating its last input."""
        chunk: list[np.ndarray] = []
        for array in self.arrays():
            chunk.append(array)
            if len(chunk) == size:
                yield np.stack(chunk), size
                chunk = []
        if chunk:
            count = len(chunk)
            if fixed:
                chunk += [chunk[-1]] * (size - count)
            yield np.stack(chunk), count


def image_inputs(
    folder: Path,
    preprocessing: Preprocessing,
    labels: list[str] | None,
    limit: int,
    exclude: set[Path] | frozenset[Path] = frozenset(),
    option: str = "--calibration-data",
) -> tuple[Inputs, int]:
    """Up to ``limit`` usable images of ``folder`` (sorted), and how many files were unreadable.

    Each image is decoded once here to find the usable ones; only the paths are kept.
    """
    if not folder.is_dir():
        raise InputError(f"{option} {folder} is not a directory of images")
    paths, targets, bad = [], [], 0
    candidates = [p for p in list_images([folder]) if p not in exclude]
    for path, array, _reason in load_images(candidates, preprocessing):
        if array is None:
            bad += 1
            continue
        paths.append(path)
        name = path.parent.name
        targets.append(labels.index(name) if labels and name in labels else None)
        if len(paths) >= limit:
            break
    return Inputs(preprocessing, paths, targets), bad


def tensors_to_calibrate(proto: onnx.ModelProto, op_types: tuple[str, ...] | None) -> list[str]:
    """The float activations that nodes of ``op_types`` read or write: the tensors whose
    ranges onnxruntime's quantizer asks for (the selection of its calibrators)."""
    infos = {v.name: v for v in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]}
    constants = {t.name for t in proto.graph.initializer}
    chosen: dict[str, None] = {}
    for node in proto.graph.node:
        if op_types and node.op_type not in op_types:
            continue
        for name in [*node.input, *node.output]:
            info = infos.get(name)
            if (
                info is not None
                and name not in constants
                and info.type.HasField("tensor_type")
                and info.type.tensor_type.elem_type in FLOAT_TYPES
            ):
                chosen[name] = None
    return list(chosen)


def element_count(info: onnx.ValueInfoProto) -> int:
    """Elements of one input's worth of a tensor (unknown dims, like the batch, count 1)."""
    count = 1
    for dim in info.type.tensor_type.shape.dim:
        count *= dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else 1
    return count


def model_batch(proto: onnx.ModelProto) -> int | None:
    """The fixed batch size of the model's input, or None when the batch axis is dynamic."""
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def augment_min_max(proto: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """``proto`` (graph only) with ReduceMin and ReduceMax of each tensor as extra outputs."""
    infos = {v.name: v for v in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]}
    reductions = {}
    for index, name in enumerate(tensors):
        reductions[name] = [
            helper.make_node(op, [name], [f"calibration/{index}/{suffix}"], keepdims=0)
            for op, suffix in (("ReduceMin", "min"), ("ReduceMax", "max"))
        ]
    augmented = with_nodes_after_producers(proto, reductions)
    for index, name in enumerate(tensors):
        elem_type = infos[name].type.tensor_type.elem_type
        augmented.graph.output.extend(
            helper.make_tensor_value_info(f"calibration/{index}/{suffix}", elem_type, [])
            for suffix in ("min", "max")
        )
    return augmented


def with_nodes_after_producers(
    proto: onnx.ModelProto, added: dict[str, list[onnx.NodeProto]]
) -> onnx.ModelProto:
    """A copy of ``proto`` with the nodes ``added[tensor]`` placed right after the node that
    makes ``tensor`` (graph inputs: first). onnxruntime runs nodes in this order where it can,
    so each tensor is reduced, and freed, as soon as it exists, not kept to the end."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(proto)
    nodes = [node for name in [i.name for i in proto.graph.input] for node in added.get(name, [])]
    for node in proto.graph.node:
        nodes.append(node)
        nodes += [extra for out in node.output for extra in added.get(out, [])]
    del augmented.graph.node[:]
    augmented.graph.node.extend(nodes)
    return augmented


def augment_outputs(proto: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """``proto`` (graph only) with each tensor as an extra output."""
    infos = {v.name: v for v in [*proto.graph.value_info, *proto.graph.input]}
    augmented = onnx.ModelProto()
    augmented.CopyFrom(proto)
    present = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(infos[name] for name in tensors if name not in present)
    return augmented


def output_groups(
    proto: onnx.ModelProto, tensors: list[str], batch: int, budget: int = OUTPUT_BUDGET_BYTES
) -> list[list[str]]:
    """``tensors`` split so that one run fetches at most ``budget`` bytes (at least one each)."""
    infos = {v.name: v for v in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]}
    groups: list[list[str]] = [[]]
    used = 0
    for name in tensors:
        size = element_count(infos[name]) * batch * 4
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


@dataclass
class SessionPlan:
    """How a quantization's onnxruntime sessions run."""

    threads: int | None
    low_memory: bool
    batch: int
    """Inputs per run."""
    fixed_batch: bool
    runtime: str = "onnxruntime"
    """Where the int8 report's logits and latency are measured (calibration and SQNR always
    run in onnxruntime)."""
    unfused: bool = False
    """Run int8 models unfused (runtimes.RunOptions.unfused): the exact arithmetic the gate
    measures when this machine's kernels saturate where the target's do not."""


def augmented_session(
    path: Path,
    plan: SessionPlan,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.InferenceSession:
    """A session for an augmented model that runs its nodes in the graph's order where it can
    (priority-based): each tensor's reductions then run, and the tensor is freed, right after
    it is made. onnxruntime's default order runs them last and holds every tensor till then
    (1.29 against 0.57 GiB peak for coatnet_2)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.log_severity_level = 3
    if plan.threads:
        options.intra_op_num_threads = plan.threads
    if plan.low_memory:
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def collect_min_max(
    augmented: Path, tensors: list[str], inputs: Inputs, plan: SessionPlan, progress: Callable
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Running min/max of each tensor over ``inputs``, one batch at a time."""
    session = augmented_session(augmented, plan)
    input_name = session.get_inputs()[0].name
    names = [f"calibration/{i}/{s}" for i in range(len(tensors)) for s in ("min", "max")]
    lows = np.full(len(tensors), np.inf, dtype=np.float32)
    highs = np.full(len(tensors), -np.inf, dtype=np.float32)
    done = 0
    for batch, count in inputs.batches(plan.batch, plan.fixed_batch):
        values = np.asarray(session.run(names, {input_name: batch}), dtype=np.float32)
        lows = np.fmin(lows, values[0::2])
        highs = np.fmax(highs, values[1::2])
        done += count
        progress(done)
    return {
        name: (np.array(lows[i], np.float32), np.array(highs[i], np.float32))
        for i, name in enumerate(tensors)
    }


def collect_histograms(
    augmented: Path,
    groups: list[list[str]],
    inputs: Inputs,
    plan: SessionPlan,
    method: str,
    progress: Callable,
) -> dict:
    """Each tensor's histogram over ``inputs``, merged batch by batch; returns onnxruntime's
    thresholds for ``method`` (entropy or percentile)."""
    session = augmented_session(augmented, plan)
    input_name = session.get_inputs()[0].name
    collector = HistogramCollector(method, False, scenario="same", **HISTOGRAM_SETTINGS[method])
    limit = MAX_BIN_FACTOR * HISTOGRAM_SETTINGS[method]["num_bins"]
    done = 0
    for batch, count in inputs.batches(plan.batch, plan.fixed_batch):
        for group in groups:
            values = session.run(group, {input_name: batch})
            with quiet_libraries():  # the collector prints a line per call
                collector.collect(dict(zip(group, values, strict=True)))
            del values
        for name, entry in collector.histogram_dict.items():
            while len(entry[0]) > limit:
                entry = coarsen(entry)
            collector.histogram_dict[name] = entry
        done += count
        progress(done)
    with quiet_libraries():
        return collector.compute_collection_result()


def coarsen(entry: tuple) -> tuple:
    """A symmetric histogram (hist, edges, min, max, threshold over [-threshold, threshold])
    with half as many bins (padded by an empty bin at each end when needed)."""
    hist, edges, low, high, threshold = entry
    stride = 2 * float(threshold) / len(hist)
    if len(hist) % 4:
        hist = np.concatenate([[0], hist, [0]])
        threshold = np.asarray(float(threshold) + stride, dtype=np.asarray(threshold).dtype)
    hist = hist.reshape(-1, 2).sum(axis=1)
    edges = np.linspace(-float(threshold), float(threshold), len(hist) + 1).astype(edges.dtype)
    return hist, edges, low, high, threshold


def calibrate_ranges(
    pre: Path,
    inputs: Inputs,
    op_types: tuple[str, ...] | None,
    method: str,
    plan: SessionPlan,
    progress: Callable[[int], None],
) -> Path:
    """Calibrate the prepared model ``pre`` on ``inputs``; returns the calibration cache that
    onnxruntime's ``quantize_static`` reads (``calibration_cache_path``).

    The augmented model and the cache are written beside ``pre``; the augmented model refers
    to ``pre``'s weights file.
    """
    work = pre.parent
    proto = onnx.load(str(pre), load_external_data=False)
    tensors = tensors_to_calibrate(proto, op_types)
    augmented = work / "calibration.onnx"
    if method == "minmax":
        onnx.save(augment_min_max(proto, tensors), str(augmented))
        ranges = collect_min_max(augmented, tensors, inputs, plan, progress)
    else:
        groups = output_groups(proto, tensors, plan.batch)
        onnx.save(augment_outputs(proto, tensors), str(augmented))
        ranges = collect_histograms(augmented, groups, inputs, plan, method, progress)
    del proto
    augmented.unlink()
    finite = {k: v for k, v in ranges.items() if all(math.isfinite(float(x)) for x in v[:2])}
    if len(finite) < len(ranges):
        bad = sorted(set(ranges) - set(finite))[:3]
        raise InputError(
            f"calibration produced non-finite ranges for {len(ranges) - len(finite)} tensor(s) "
            f"(e.g. {', '.join(bad)}): the model gives NaN or inf on the calibration inputs"
        )
    cache = work / "calibration.json"
    save_tensors_data(TensorsData(METHODS[method], ranges), cache)
    return cache
