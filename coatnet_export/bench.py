"""Fair latency measurement: interleaved runs, warm-up, percentiles, the machine's matmul peak."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from coatnet_export.console import Progress
from coatnet_export.layout import INT8_FILE, MODEL_FILE

if TYPE_CHECKING:
    from models import TimmSpec, VariantSpec

REWARM_CALLS = 1
"""Untimed calls before each timed one, after switching candidates: they absorb the switch
(caches, the previous runtime's worker threads winding down)."""
SETTLE_S = 0.02
"""Idle time before switching candidates: onnxruntime's workers spin after a run (as deployed)
and OpenVINO's briefly too; they park within it, so no session's spinning threads take the
cores from the next one's run."""


@dataclass
class LatencyStats:
    """Latency percentiles of one candidate at one batch size and thread count."""

    name: str
    runtime: str
    batch: int
    threads: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    images_per_s: float
    gflops_per_s: float | None = None
    pct_of_peak: float | None = None
    """GFLOP/s as a share of the 2048² fp32 matmul's, timed in the same interleaved rounds."""

    def as_dict(self) -> dict:
        return asdict(self)


Key = TypeVar("Key", bound=Hashable)


def time_interleaved(
    candidates: Mapping[Key, Callable[[], object]], warmup: int, runs: int
) -> dict[Key, list[float]]:
    """Seconds per call of each candidate, measured round-robin so drift hits all alike.

    Every candidate is warmed up first; each round then calls every candidate in turn,
    rotating the order, timing one call after :data:`REWARM_CALLS` untimed ones, each switch
    after :data:`SETTLE_S` idle, so one session's spinning threads never overlap another's run.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    names = list(candidates)
    samples: dict[Key, list[float]] = {name: [] for name in names}
    for round_index in range(runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(SETTLE_S)
            for _ in range(REWARM_CALLS):
                candidates[name]()
            start = time.perf_counter()
            candidates[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def summarize(
    name: str,
    seconds: list[float],
    batch: int,
    threads: int,
    macs_per_image: int | None = None,
    runtime: str = "onnxruntime",
    peak_gflops: float | None = None,
) -> LatencyStats:
    """Percentiles in milliseconds, throughput, achieved GFLOP/s (2 FLOPs per MAC) and, given
    the matmul rate of the same rounds, their share of it."""
    ms = np.asarray(seconds) * 1000
    p50 = float(np.percentile(ms, 50))
    gflops = None if macs_per_image is None else 2 * macs_per_image * batch / (p50 / 1000) / 1e9
    share = None if gflops is None or not peak_gflops else 100 * gflops / peak_gflops
    return LatencyStats(
        name,
        runtime,
        batch,
        threads,
        len(seconds),
        p50,
        float(np.percentile(ms, 90)),
        float(np.percentile(ms, 99)),
        batch / (p50 / 1000),
        gflops,
        share,
    )


MATMUL = "2048² fp32 matmul"
"""The candidate that measures the machine's practical peak beside the models."""


def matmul_runner(threads: int, n: int = 2048) -> tuple[Callable[[], object], float]:
    """An n x n fp32 matmul in onnxruntime (the machine's practical peak) and its FLOPs."""
    spec = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "ABC"]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul", spec[:2], spec[2:]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    feeds = {
        "A": rng.standard_normal((n, n), dtype=np.float32),
        "B": rng.standard_normal((n, n), dtype=np.float32),
    }
    return (lambda: session.run(None, feeds)), 2.0 * n**3


@dataclass
class ProcessRun:
    """Wall time, peak resident memory and exit code of a child process."""

    wall_s: float
    peak_rss_bytes: int
    """The largest sum of resident memory over the process and its descendants at one time
    (an export runs its PyTorch half in a child), at least the largest single process's."""
    returncode: int
    output: str


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> ProcessRun:
    """Run a command; its wall time and the peak memory of its process tree: the summed RSS
    sampled every 10 ms, and the kernel's peak of each process (rusage) as a floor."""
    start = time.perf_counter()
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as process:
        sampler = TreeMemory(process.pid)
        sampler.start()
        output = process.stdout.read() if process.stdout else ""
        _, status, usage = os.wait4(process.pid, 0)
        sampler.stop()
        process.returncode = os.waitstatus_to_exitcode(status)
    peak = max(usage.ru_maxrss * 1024, sampler.peak_bytes)
    return ProcessRun(time.perf_counter() - start, peak, process.returncode, output)


class TreeMemory(threading.Thread):
    """Samples the summed VmRSS of a process and its descendants (Linux /proc)."""

    def __init__(self, pid: int, every_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.peak_bytes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            self.peak_bytes = max(self.peak_bytes, sum(map(rss_bytes, process_tree(self.pid))))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (none of them if it has ended)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    todo += [int(child) for child in children.read().split()]
    return tree


def rss_bytes(pid: int) -> int:
    """A process's resident memory now (0 once it has ended)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class BenchTarget:
    """One thing to time: a name, its runtime and a factory that returns ``run(batch_array)``."""

    name: str
    make_runner: Callable[[int], Callable[[np.ndarray], object]]
    """Called with a thread count; returns a callable that runs one batch."""
    runtime: str = "onnxruntime"

    @property
    def key(self) -> str:
        """Unique among the targets of one benchmark (a model may run in several runtimes)."""
        return f"{self.name} [{self.runtime}]"


def model_target(name: str, path, runtime: str = "onnxruntime", precision: str = "f32"):
    """An ONNX file in ``runtime`` as deployed (CPU; onnxruntime: all optimisations, its
    default spinning worker threads; OpenVINO: ``precision``, latency mode).

    Spinning is timed as onnxruntime ships it (on): it spares each small operator a thread
    wake-up (coatnet_0 batch 1: fp32 7 %, int8 15 % faster on an Intel Xeon), and the
    untimed call before each timed one (:data:`REWARM_CALLS`) lets the previous candidate's
    threads go idle (a 1-20 ms pause between candidates changed nothing measurable).
    """
    from coatnet_export.runtimes import RunOptions, load_model

    def make_runner(threads: int):
        options = RunOptions(threads, precision=precision)
        return load_model(path, runtime, options).run

    label = runtime if precision == "f32" else f"{runtime} {precision}"
    return BenchTarget(name, make_runner, label)


def torch_target(model) -> BenchTarget:
    """The PyTorch model in eager mode (inference mode, the given thread count)."""
    import torch

    def make_runner(threads: int):
        def run(x: np.ndarray) -> object:
            torch.set_num_threads(threads)
            with torch.inference_mode():
                return model(torch.from_numpy(x))

        return run

    return BenchTarget("pytorch eager", make_runner, "pytorch")


def benchmark(
    plan: BenchPlan, options: BenchOptions, progress: Progress
) -> tuple[list[LatencyStats], dict[tuple[int, int], float]]:
    """Time every target at every batch size and thread count, interleaved within each setting
    together with a 2048² fp32 matmul, whose rate in the same rounds is each row's peak.
    Returns the rows and the matmul GFLOP/s by (threads, batch)."""
    rows: list[LatencyStats] = []
    peaks: dict[tuple[int, int], float] = {}
    rng = np.random.default_rng(0)
    targets, runs = plan.targets, options.runs
    for thread_count in options.thread_counts:
        runners = {t.key: t.make_runner(thread_count) for t in targets}
        matmul, matmul_flops = matmul_runner(thread_count)
        for batch in options.batches:
            label = (
                f"{thread_count} thread(s), batch {batch}: {len(targets)} target(s) and the "
                f"matmul x {runs} runs"
            )
            with progress.step(label):
                x = rng.standard_normal((batch, *plan.input_shape), dtype=np.float32)
                candidates = {n: (lambda r=r, x=x: r(x)) for n, r in runners.items()}
                samples = time_interleaved({**candidates, MATMUL: matmul}, options.warmup, runs)
            peak = matmul_flops / float(np.median(samples[MATMUL])) / 1e9
            peaks[thread_count, batch] = peak
            rows += [
                summarize(
                    t.name,
                    samples[t.key],
                    batch,
                    thread_count,
                    plan.macs_per_image,
                    t.runtime,
                    peak,
                )
                for t in targets
            ]
    return rows, peaks


def describe_peaks(peaks: dict[tuple[int, int], float]) -> str:
    """The matmul rates of a benchmark, for the line under its table."""
    return f"{MATMUL}, in the same rounds: " + ", ".join(
        f"{gflops:.0f} GFLOP/s ({threads} thread(s), batch {batch} rounds)"
        for (threads, batch), gflops in peaks.items()
    )


INT8_OPS = {
    "QuantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
}


def describe_onnx(path):
    """A short label ("onnx fp32", "onnx int8", or "onnx int8 for openvino" for an int8 graph
    laid out for OpenVINO) and the coatnet-export metadata, if any."""
    from coatnet_export.describe import load_proto, metadata_of
    from coatnet_export.metadata import int8_layout

    proto = load_proto(path)
    metadata = metadata_of(proto)
    if not any(n.op_type in INT8_OPS for n in proto.graph.node):
        return "onnx fp32", metadata
    runtime = int8_layout(metadata)
    return ("onnx int8" if runtime == "onnxruntime" else f"onnx int8 for {runtime}"), metadata


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """What ``coatnet-export bench`` was asked to do."""

    models: tuple[Path, ...] = ()
    """.onnx files or export folders (whose model.onnx and model.int8.onnx are both taken)."""
    variant: str | None = None
    """Also time this variant in PyTorch eager; without models, export it first."""
    img_size: tuple[int, int] | None = None
    batches: tuple[int, ...] = (1, 8)
    threads: tuple[int, ...] = ()
    """Thread counts; none: 1 and all cores."""
    runs: int = 20
    warmup: int = 3
    with_torch: bool = True
    runtimes: tuple[str, ...] = ("onnxruntime",)
    precision: str = "f32"
    """OpenVINO's inference precision."""

    @property
    def thread_counts(self) -> list[int]:
        return list(dict.fromkeys(self.threads)) or sorted({1, os.cpu_count() or 1})


@dataclass(frozen=True)
class BenchPlan:
    targets: list[BenchTarget]
    labels: dict[str, str]
    """Target name -> what it is (a path, or the variant)."""
    input_shape: tuple[int, int, int]
    macs_per_image: int | None
    """None: not known (no GFLOP/s column)."""


BENCH_COLUMNS = (
    "name",
    "runtime",
    "threads",
    "batch",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "images_per_s",
    "gflops_per_s",
    "pct_of_peak",
)


@dataclass(frozen=True)
class BenchOutcome:
    """Each target's latency at each setting, and the matmul peak of the same rounds."""

    labels: dict[str, str]
    results: list[LatencyStats]
    peaks: dict[tuple[int, int], float]
    """Matmul GFLOP/s by (threads, batch)."""
    gflop_per_image: float

    def rows(self) -> list[dict]:
        return [r.as_dict() for r in self.results]

    def as_dict(self) -> dict:
        return {
            "targets": self.labels,
            "results": self.rows(),
            "matmul_gflops": {f"{t}x{b}": v for (t, b), v in self.peaks.items()},
            "gflop_per_image": self.gflop_per_image,
        }


def run_bench(options: BenchOptions, progress: Progress) -> BenchOutcome:
    """Plan the targets (exporting --variant when no model is given), then time them."""
    with tempfile.TemporaryDirectory() as workdir:
        plan = plan_bench(options, Path(workdir), progress)
        rows, peaks = benchmark(plan, options, progress)
    return BenchOutcome(plan.labels, rows, peaks, (plan.macs_per_image or 0) * 2 / 1e9)


def plan_bench(options: BenchOptions, workdir: Path, progress: Progress) -> BenchPlan:
    """Targets for ``coatnet-export bench``: the given ONNX models in every runtime, and PyTorch
    eager. ``options.precision`` applies to OpenVINO; the largest batch must fit in memory."""
    from coatnet_export.describe import resolve_model_path
    from coatnet_export.errors import InputError
    from coatnet_export.export.pipeline import ExportOptions, run_export
    from models import (
        architecture_from_dict,
        get_variant,
        init_weights,
        materialize,
        variant_cost,
    )

    variant, img_size, largest_batch = options.variant, options.img_size, max(options.batches)
    settings = len(options.thread_counts) * len(options.batches)
    paths: list[Path] = []
    for given in options.models:
        if given.is_dir() and (given / INT8_FILE).is_file():
            paths += [given / MODEL_FILE, given / INT8_FILE]
        else:
            paths.append(resolve_model_path(given))
    architecture = get_variant(variant) if variant else None
    if not paths:
        if architecture is None or variant is None:
            raise InputError("give ONNX models to time, or --variant NAME")
        check_bench_memory(architecture, img_size or (224, 224), 3, 1000, largest_batch)
        progress.expect(settings + 1)
        with progress.step(f"exporting {variant} (fp32) for the benchmark"):
            outcome = run_export(
                ExportOptions(
                    architecture=architecture,
                    output=workdir / variant,
                    img_size=img_size,
                    validate=False,
                ),
                Progress(enabled=False),
            )
        paths.append(outcome.directory / MODEL_FILE)
    described = [(path, *describe_onnx(path)) for path in paths]
    metadata = next((m for _, _, m in described if m), None)
    if architecture is None and metadata is not None:
        architecture = architecture_from_dict(metadata.architecture)
    if architecture is None:
        raise InputError("the models carry no coatnet-export metadata: pass --variant")
    size = img_size or (tuple(metadata.img_size) if metadata else (224, 224))
    channels = metadata.in_channels if metadata else 3
    classes = metadata.num_classes if metadata else 1000
    check_bench_memory(architecture, size, channels, classes, largest_batch)
    progress.expect(progress.done + settings)
    targets, labels = [], {}
    if options.with_torch:
        model = init_weights(
            materialize(architecture.build(size, classes, channels, device="meta")), 0
        ).eval()
        targets.append(torch_target(model))
        labels["pytorch eager"] = f"{architecture.name} (seeded weights)"
    for path, kind, _ in described:
        name = kind if kind not in labels else f"{kind} ({path.name})"
        labels[name] = str(path)
        for runtime in dict.fromkeys(options.runtimes):
            openvino_precision = options.precision if runtime == "openvino" else "f32"
            targets.append(model_target(name, path, runtime, openvino_precision))
    macs = variant_cost(architecture, size, classes, channels).macs
    return BenchPlan(targets, labels, (channels, *size), macs)


def check_bench_memory(
    architecture: VariantSpec | TimmSpec,
    size: tuple[int, int],
    channels: int,
    classes: int,
    batch: int,
) -> None:
    """Refuse a ``--batch`` whose model, activations and input cannot fit in memory."""
    from coatnet_export.sources.model_source import ModelSpec
    from coatnet_export.sources.resources import check_memory

    spec = ModelSpec(architecture, size, channels, classes)
    check_memory(spec, batch, batch, "use a smaller --batch")
