"""int8 quantization of an export for CPU inference, on top of onnxruntime.quantization.

check the model and the inputs -> choose the types for the target CPU and the gate -> prepare
(graph.prepare) -> calibrate in bounded memory (calibrate.calibrate) -> quantize (onnxruntime,
static QDQ from the calibration cache, or dynamic; graph.Recipe picks the nodes) -> compact the
baked biases -> compare with fp32 on held-out inputs -> while the gate fails, return the nodes
behind the lowest-SQNR activations to float and quantize again -> time fp32 and int8 ->
write model.int8.onnx (+ .data above the external-data threshold), quantization.json and the
manifest beside model.onnx, each under a temporary name first, renamed together at the end.

Every file is written in a hidden work folder inside the export folder (``.quantize-*``),
removed whatever happens; the work files keep their weights in external data files, so no
step holds more than one copy of the fp32 weights in Python.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

from coatnet_export.bench import INT8_OPS
from coatnet_export.console import quiet_libraries
from coatnet_export.errors import InputError, os_error_message, signals_deferred, writing
from coatnet_export.export import package
from coatnet_export.inspect import load_proto, metadata_of, resolve_model_path
from coatnet_export.metadata import ExportMetadata, write_json, write_props
from coatnet_export.output import lock
from coatnet_export.preprocess import Preprocessing
from coatnet_export.quantize.calibrate import (
    METHODS,
    Inputs,
    SessionPlan,
    calibrate,
    image_inputs,
    model_batch,
)
from coatnet_export.quantize.evaluate import (
    Agreement,
    Gate,
    agreement,
    choose_gate,
    latency,
    logits,
    lowest_sqnr,
)
from coatnet_export.quantize.graph import (
    DEFAULT_RECIPE,
    DYNAMIC_OPS,
    RECIPES,
    RUNTIME_RECIPES,
    Recipe,
    compact_biases,
    nodes_to_float,
    prepare,
)
from coatnet_export.quantize.presets import Judgement, QuantChoice, choose_types, judge
from coatnet_export.quantize.report import QuantReport, metadata_quantization
from coatnet_export.runtimes import LOW_MEMORY_BYTES, check_runtime

INT8_FILE = "model.int8.onnx"
REPORT_FILE = "quantization.json"
MANIFEST_FILE = "manifest.json"
WORK_PREFIX = ".quantize-"
TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
SQNR_SAMPLES = 8
"""Held-out inputs the per-tensor SQNR is measured on."""
RANDOM_EVAL_SAMPLES = 32
EVAL_BATCH = 8
"""Held-out inputs per run of a plain (not augmented) model."""


@dataclass
class QuantOptions:
    """What ``coatnet-export quantize`` was asked to do."""

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
    that runtime's kernels (graph.RUNTIME_RECIPES), and the report's agreement and latency
    are measured there."""
    seed: int = 0
    dynamic_hint: str = "--mode dynamic"
    """How the command that runs this spells dynamic quantization (for error messages)."""

    recipe_key: str | None = None
    """``--recipe``: a static recipe of graph.RECIPES; None takes the target CPU's fastest in
    :attr:`runtime` (presets.CpuPreset.recipes), resolved by :func:`run_quantize`."""

    @property
    def recipe(self) -> Recipe:
        """The static recipe: ``recipe_key``'s, else the one for :attr:`runtime`."""
        return RECIPES[self.recipe_key] if self.recipe_key else RUNTIME_RECIPES[self.runtime]


@dataclass
class Source:
    """The fp32 model to quantize, checked."""

    model_path: Path
    metadata: ExportMetadata | None
    preprocessing: Preprocessing
    weight_bytes: int
    fixed_batch: int | None

    @property
    def folder(self) -> Path:
        return self.model_path.parent

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.preprocessing.channels, *self.preprocessing.size)

    def plan(self, threads: int | None, batch: int = 1) -> SessionPlan:
        """How onnxruntime sessions run this model: batches of ``batch`` (or the model's fixed
        batch); large weights in low-memory sessions, one input at a time."""
        large = self.weight_bytes >= LOW_MEMORY_BYTES
        return SessionPlan(
            threads,
            large,
            self.fixed_batch or (1 if large else batch),
            self.fixed_batch is not None,
        )


@dataclass
class Data:
    """The inputs quantization runs on."""

    calibration: Inputs | None
    evaluation: Inputs
    calibration_source: str
    notes: list[str] = field(default_factory=list)


@dataclass
class Attempt:
    """One quantization of the prepared model, and how it compares with fp32."""

    path: Path
    excluded: list[str]
    result: Agreement


def check_source(target: Path, preprocessing: Preprocessing | None) -> Source:
    """The fp32 model at ``target``, refused before any heavy work if it cannot be quantized."""
    model_path = resolve_model_path(target)
    proto = load_proto(model_path)  # whole, one input, external data present and complete
    if any(n.op_type in INT8_OPS or n.op_type == "DequantizeLinear" for n in proto.graph.node):
        raise InputError(f"{model_path} is already quantized; quantize the fp32 model.onnx")
    metadata = metadata_of(proto, model_path)
    if preprocessing is None:
        if metadata is None:
            raise InputError(
                f"{model_path} has no coatnet-export metadata, so its preprocessing "
                "is unknown: pass --size H W, --mean and --std"
            )
        preprocessing = metadata.preprocessing()
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    wanted = (preprocessing.channels, *preprocessing.size)
    fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(fixed) != 4 or any(
        f is not None and f != w for f, w in zip(fixed[1:], wanted, strict=False)
    ):
        raise InputError(
            f"{model_path} takes input {fixed}, but the preprocessing gives {list(wanted)} per "
            "image (check --size and the number of --mean/--std values)"
        )
    weights = sum(_tensor_bytes(t) for t in proto.graph.initializer)
    return Source(model_path, metadata, preprocessing, weights, model_batch(proto))


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if uses_external_data(tensor):
        return int({e.key: e.value for e in tensor.external_data}.get("length", 0))
    count = 1
    for d in tensor.dims:
        count *= d
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def check_options(opts: QuantOptions) -> None:
    """What can be checked before the model exists (``export --quantize`` checks it before
    exporting): a calibration source for static quantization, folders that are folders, the
    runtime installed."""
    check_runtime(opts.runtime)
    if opts.recipe_key is not None and opts.recipe_key not in RECIPES:
        raise InputError(f"unknown recipe {opts.recipe_key!r} (choose one of {', '.join(RECIPES)})")
    if opts.recipe_key is not None and opts.mode != "static":
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


def gather_data(source: Source, opts: QuantOptions) -> Data:
    """The calibration and held-out inputs (images are decoded once to check them, then only
    their paths are kept)."""
    labels = source.metadata.labels if source.metadata else None
    calibration, notes, described = None, [], "none (dynamic quantization)"
    if opts.mode == "static":
        if opts.calibration_data is not None:
            calibration, bad = image_inputs(
                opts.calibration_data, source.preprocessing, labels, opts.samples
            )
            if bad:
                notes.append(f"skipped {bad} unreadable calibration file(s)")
            if not len(calibration):
                raise InputError(
                    f"no usable image in {opts.calibration_data}"
                    + (f" ({bad} unreadable file(s))" if bad else "")
                )
            described = f"{len(calibration)} images from {opts.calibration_data}"
        else:
            calibration = Inputs(source.preprocessing, random=opts.samples, seed=opts.seed)
            described = f"{opts.samples} random inputs"
            notes.append(
                "calibrated on random inputs: activation ranges of noise, not of "
                "images, usually cost accuracy; use --calibration-data"
            )
    evaluation = Inputs(source.preprocessing)
    if opts.eval_data is not None:
        evaluation, _ = image_inputs(
            opts.eval_data, source.preprocessing, labels, opts.eval_samples, option="--eval-data"
        )
    elif opts.calibration_data is not None:
        used = set(calibration.paths) if calibration else set()
        evaluation, _ = image_inputs(
            opts.calibration_data, source.preprocessing, labels, opts.eval_samples, used
        )
    if not len(evaluation):
        evaluation = Inputs(source.preprocessing, random=RANDOM_EVAL_SAMPLES, seed=opts.seed + 1)
        notes.append(
            "no held-out images (give --eval-data DIR): agreement measured on random inputs"
        )
    return Data(calibration, evaluation, described, notes)


@contextmanager
def workspace(folder: Path) -> Iterator[Path]:
    """A hidden work folder inside ``folder``, under the lock on its int8 model; work folders
    that a killed run left behind are removed first. Removed on exit, whatever happens."""
    with ExitStack() as stack:
        try:
            stack.enter_context(lock(folder / INT8_FILE, option="model folder"))
            for stale in folder.glob(f"{WORK_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=folder))
        except OSError as exc:
            raise InputError(f"{folder} is not writable ({os_error_message(exc)})") from None
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        yield work


def quantize_once(
    pre: Path,
    out: Path,
    opts: QuantOptions,
    choice: QuantChoice,
    cache: Path | None,
    exclude: list[str],
    recipe: Recipe = DEFAULT_RECIPE,
) -> int:
    """One onnxruntime quantization of the prepared model ``pre`` (static: the op types of
    ``recipe``), its baked biases compacted, into ``out`` with its weights in ``out.data``;
    returns the bytes the compaction saved."""
    raw = out.with_name(f"raw-{out.name}")
    with quiet_libraries():
        if opts.mode == "dynamic":
            quantize_dynamic(
                str(pre),
                str(raw),
                op_types_to_quantize=list(DYNAMIC_OPS),
                per_channel=opts.per_channel,
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
                per_channel=opts.per_channel,
                reduce_range=choice.reduce_range,
                activation_type=TYPES[choice.activation_type],
                weight_type=TYPES[choice.weight_type],
                nodes_to_exclude=exclude,
                calibrate_method=METHODS[opts.method],
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


class Steps:
    """Step lines through ``say``, each with the seconds the previous step took."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        self.say(f"[{time.perf_counter() - self.start:6.1f} s] {text}")

    def counter(self, what: str, total: int, every_s: float = 15.0) -> Callable[[int], None]:
        """A callback for ``done`` items out of ``total``, printing at most every ``every_s``."""
        last = [time.perf_counter()]

        def report(done: int) -> None:
            now = time.perf_counter()
            if now - last[0] >= every_s or done == total:
                last[0] = now
                self(f"{what} {done}/{total}")

        return report


def run_quantize(
    target: Path, opts: QuantOptions, say: Callable[[str], None], preprocessing=None
) -> tuple[Path, QuantReport]:
    """Quantize the fp32 export at ``target``; writes ``model.int8.onnx`` and a report beside it."""
    check_options(opts)
    source = check_source(target, preprocessing)
    choice = choose_types(
        opts.target_cpu, opts.activation_type, opts.weight_type, opts.reduce_range
    )
    if opts.mode == "dynamic" and choice.activation_type != "uint8":
        choice.activation_type = "uint8"
        choice.reason += "; dynamic quantization computes u8 activations whatever the target"
    if opts.mode == "static" and opts.recipe_key is None:
        opts = replace(opts, recipe_key=choice.recipes.get(opts.runtime))
    gate = choose_gate(opts.gate, source.metadata, opts.min_top1, opts.min_cosine)
    judgement = judge(choice)
    data = gather_data(source, opts)
    progress = Steps(say)
    progress(choice.describe())
    progress(f"gate: {gate.label} >= {gate.threshold} ({gate.reason})")
    progress(f"gate measured on {judgement.label}: {judgement.reason}")
    with workspace(source.folder) as work, writing(source.folder, "model folder"):
        report = quantize_in(work, source, opts, choice, gate, judgement, data, progress)
        publish_outputs(work, source, report)
    return source.folder / INT8_FILE, report


def quantize_in(
    work: Path,
    source: Source,
    opts: QuantOptions,
    choice: QuantChoice,
    gate: Gate,
    judgement: Judgement,
    data: Data,
    progress: Steps,
) -> QuantReport:
    """Every heavy step, in ``work``; leaves model.int8.onnx (+ .data), quantization.json and
    manifest.json there."""
    plan = source.plan(opts.threads)  # one input per run: augmented models hold more
    batched = replace(source.plan(opts.threads, EVAL_BATCH), runtime=opts.runtime)
    pre = work / "pre.onnx"
    progress("preparing the fp32 model (onnxruntime basic optimisation, shape inference)")
    split = opts.mode == "static" and opts.recipe.split_attention
    prepare(source.model_path, pre, plan.low_memory, split)
    cache = None
    if data.calibration is not None:
        count = len(data.calibration)
        progress(f"calibrating ({opts.method}) on {count} inputs, {plan.batch} per run")
        cache = calibrate(
            pre,
            data.calibration,
            opts.recipe.op_types,
            opts.method,
            plan,
            progress.counter("calibrated", count),
        )
    progress(f"fp32 logits on {len(data.evaluation)} held-out inputs")
    reference = logits(source.model_path, data.evaluation, batched)
    attempts, steps, compact = quantize_until_gate(
        pre, work, source, opts, choice, replace(gate, exact=judgement.exact), data, cache,
        reference, progress,
    )  # fmt: skip
    final = attempts[-1]
    native = None
    if judgement.exact:
        progress(f"int8 logits on this machine's kernels ({opts.runtime}), for the report")
        native = agreement(
            reference, logits(final.path, data.evaluation, batched), data.evaluation.targets
        )
    worst: list[tuple[str, float]] = []
    if opts.mode == "static":
        progress(f"per-activation SQNR on {len(data.evaluation.take(SQNR_SAMPLES))} inputs")
        worst = lowest_sqnr(pre, final.path, data.evaluation.take(SQNR_SAMPLES), plan)
    timed = {"fp32": source.model_path, "int8": final.path}
    if steps:
        timed["int8 before fallback"] = attempts[0].path
    progress(f"timing {', '.join(timed)} ({opts.latency_runs} runs each, batch {plan.batch})")
    timed_plan = replace(plan, runtime=opts.runtime)
    timings = latency(timed, source.input_shape, timed_plan, opts.latency_runs)
    report = QuantReport.build(
        opts, choice, gate, data, final, attempts[0], steps, timings, worst, compact, timed_plan
    )
    report.judgement = {
        "measured": judgement.label,
        "exact": judgement.exact,
        "reason": judgement.reason,
    }
    report.native_agreement = native
    progress("writing model.int8.onnx")
    write_outputs(work, source, final, report)
    return report


def quantize_until_gate(
    pre: Path,
    work: Path,
    source: Source,
    opts: QuantOptions,
    choice: QuantChoice,
    gate: Gate,
    data: Data,
    cache: Path | None,
    reference: np.ndarray,
    progress: Steps,
) -> tuple[list[Attempt], list[list[str]], int]:
    """Quantize, compare with fp32, and while the gate fails (static mode), return the nodes
    behind the worst activations to float and quantize again, up to the allowed steps.
    Returns every attempt, the fallback steps and the bytes the bias compaction saved."""
    plan = source.plan(opts.threads)
    batched = replace(source.plan(opts.threads, EVAL_BATCH), runtime=opts.runtime)
    if gate.exact:  # as the target computes (presets.judge), whatever --runtime
        batched = replace(batched, runtime="onnxruntime", unfused=True)
    proto = onnx.load(str(pre), load_external_data=False)
    exclude = opts.recipe.exclusions(proto) if opts.mode == "static" else []
    del proto
    attempts: list[Attempt] = []
    steps: list[list[str]] = []
    while True:
        path = work / f"int8-{len(attempts)}.onnx"
        step_note = f", fallback step {len(steps)}" if steps else ""
        progress(f"quantizing ({opts.mode}{step_note})")
        compact = quantize_once(pre, path, opts, choice, cache, exclude, opts.recipe)
        int8 = logits(path, data.evaluation, batched)
        result = agreement(reference, int8, data.evaluation.targets)
        attempts.append(Attempt(path, list(exclude), result))
        progress(f"gate: {gate.describe(result)}")
        if gate.passed(result) or opts.mode != "static" or len(steps) >= opts.max_fallback_steps:
            return attempts, steps, compact
        progress("measuring per-activation SQNR to choose nodes for float")
        step = fallback_step(pre, attempts[-1], data.evaluation, plan, opts.fallback_per_step)
        if not step:
            return attempts, steps, compact
        progress(f"returning to float: {', '.join(step)}")
        steps.append(step)
        exclude = exclude + step


def write_outputs(work: Path, source: Source, final: Attempt, report: QuantReport) -> None:
    """model.int8.onnx with its metadata (weights in model.int8.onnx.data above the
    external-data threshold), quantization.json and the updated manifest, all in ``work``."""
    model = onnx.load(str(final.path))
    if source.metadata is not None:
        source.metadata.quantization = metadata_quantization(report)
        write_props(model, source.metadata)
    weights = sum(_tensor_bytes(t) for t in model.graph.initializer)
    external = weights > package.EXTERNAL_DATA_THRESHOLD
    save_model(model, work / INT8_FILE, external)
    del model
    files = {INT8_FILE: (work / INT8_FILE).stat().st_size}
    if external:
        files[f"{INT8_FILE}.data"] = (work / f"{INT8_FILE}.data").stat().st_size
    report.sizes = {"fp32": _file_bytes(source.model_path), "int8": sum(files.values())}
    report.files = list(files)
    write_json(work / REPORT_FILE, report.as_dict())
    manifest_path = source.folder / MANIFEST_FILE
    if manifest_path.is_file():  # the export's manifest lists the int8 model too
        manifest = json.loads(manifest_path.read_text())
        listed = manifest.setdefault("files", {})
        for name in (INT8_FILE, f"{INT8_FILE}.data"):
            listed.pop(name, None)
        listed.update(files)
        manifest["quantization"] = {"files": list(files), **metadata_quantization(report)}
        write_json(work / MANIFEST_FILE, manifest)


def publish_outputs(work: Path, source: Source, report: QuantReport) -> None:
    """Move the outputs from ``work`` into the export folder: renames, signals held back."""
    folder = source.folder
    names = [f"{INT8_FILE}.data", INT8_FILE, REPORT_FILE, MANIFEST_FILE]
    umask = os.umask(0)
    os.umask(umask)
    for name in names:  # onnx writes external data private (0600); give the usual mode
        if (work / name).exists():
            (work / name).chmod(0o666 & ~umask)
    with signals_deferred():
        for name in names:
            if (work / name).exists():
                (work / name).replace(folder / name)
        if f"{INT8_FILE}.data" not in report.files:
            (folder / f"{INT8_FILE}.data").unlink(missing_ok=True)


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
