"""int8 quantization of an export for CPU inference, on top of onnxruntime.quantization.

prepare (quant_graph.prepare) -> choose types for this CPU -> quantize (static QDQ with
calibration images, or dynamic; quant_graph.Recipe picks the nodes) -> store the baked biases
as fp16 -> evaluate against fp32 on held-out images -> while the top-1 gate fails, return the
lowest-SQNR tensors to float (qdq_loss_debug) and quantize again -> report.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.qdq_loss_debug import (
    collect_activations,
    compute_activation_error,
    create_activation_matching,
    modify_model_output_intermediate_tensors,
)

from coatnet_export.bench import INT8_OPS, time_interleaved
from coatnet_export.console import quiet_libraries
from coatnet_export.errors import InputError
from coatnet_export.inspect import load_proto, metadata_of
from coatnet_export.metadata import write_json, write_props
from coatnet_export.preprocess import Preprocessing, list_images, load_images
from coatnet_export.quantize.graph import (
    DEFAULT_RECIPE,
    FALLBACK_OPS,
    Recipe,
    compact_biases,
    prepare,
)
from coatnet_export.runtimes.onnxruntime import make_session, run_session

INT8_FILE = "model.int8.onnx"
REPORT_FILE = "quantization.json"
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
DYNAMIC_OPS = ("MatMul", "Gemm")
"""Dynamic quantization leaves Conv float: ConvInteger brought no speed on this machine."""


@dataclass(frozen=True)
class CpuInt8:
    """The int8 capabilities that decide activation/weight types and reduce_range."""

    arch: str
    features: tuple[str, ...]

    @classmethod
    def detect(cls) -> CpuInt8:
        flags: set[str] = set()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
        except OSError:
            pass
        wanted = ("avx512_vnni", "avx_vnni", "avx512f", "avx2", "asimddp")
        return cls(platform.machine(), tuple(f for f in wanted if f in flags))


@dataclass
class QuantChoice:
    """Activation/weight types and reduce_range, with the reason for them."""

    activation_type: str
    weight_type: str
    reduce_range: bool
    reason: str


def choose_types(cpu: CpuInt8) -> QuantChoice:
    """onnxruntime's guidance per CPU: U8S8 everywhere, with reduce_range where it saturates."""
    if "avx512_vnni" in cpu.features or "avx_vnni" in cpu.features:
        return QuantChoice(
            "uint8",
            "int8",
            False,
            "x86 with VNNI: u8 x s8 dot products "
            "accumulate in 32 bits, no saturation; full 8-bit range",
        )
    if "asimddp" in cpu.features:
        return QuantChoice(
            "uint8",
            "int8",
            False,
            "ARM with dot-product instructions: u8/s8 "
            "products accumulate in 32 bits; full 8-bit range",
        )
    if "avx2" in cpu.features or "avx512f" in cpu.features:
        return QuantChoice(
            "uint8",
            "int8",
            True,
            "x86 without VNNI: u8 x s8 pairs can saturate "
            "the 16-bit intermediate (vpmaddubsw); reduce_range keeps weights in "
            "7 bits, as onnxruntime advises",
        )
    return QuantChoice(
        "uint8",
        "int8",
        True,
        f"no known int8 dot-product instructions on {cpu.arch}; reduce_range for safety",
    )


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
    activation_type: str | None = None
    weight_type: str | None = None
    reduce_range: bool | None = None
    per_channel: bool = True
    min_top1: float = 0.99
    max_fallback_steps: int = 4
    fallback_per_step: int = 3
    threads: int | None = None
    latency_runs: int = 20
    seed: int = 0


@dataclass
class Agreement:
    """How the int8 model's outputs compare with fp32's on held-out inputs."""

    samples: int
    top1: float
    top5: float
    min_cosine: float
    max_abs: float
    fp32_accuracy: float | None = None
    int8_accuracy: float | None = None


@dataclass
class QuantReport:
    mode: str
    quantized_ops: list[str]
    """The recipe's op types (static) or those of dynamic quantization."""
    choice: QuantChoice
    cpu: CpuInt8
    calibration: str
    excluded_nodes: list[str]
    fallback_steps: list[list[str]]
    agreement: Agreement
    sizes: dict[str, int]
    latency_ms: dict[str, float]
    speedup: float
    lowest_sqnr: list[dict[str, float | str]]
    compact_bias_bytes: int
    passed: bool
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class ImageReader(CalibrationDataReader):
    """Feeds preprocessed images (one per call) to onnxruntime's calibrators."""

    def __init__(self, input_name: str, arrays: list[np.ndarray]) -> None:
        self.input_name = input_name
        self.arrays = arrays
        self._iter: Iterator[np.ndarray] = iter(arrays)

    def get_next(self) -> dict[str, np.ndarray] | None:
        array = next(self._iter, None)
        return None if array is None else {self.input_name: array[None]}

    def rewind(self) -> None:
        self._iter = iter(self.arrays)


def read_image_folder(
    folder: Path,
    preprocessing: Preprocessing,
    labels: list[str] | None,
    limit: int | None = None,
    skip: int = 0,
) -> tuple[list[np.ndarray], list[int | None], int]:
    """Preprocessed images of a folder (sorted), their labels from class sub-folder names where
    those name a class, and how many files were unreadable."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a directory of images")
    paths = list_images([folder])[skip:]
    arrays, targets, bad = [], [], 0
    for path, array, _reason in load_images(paths, preprocessing):
        if array is None:
            bad += 1
            continue
        arrays.append(array)
        name = path.parent.name
        targets.append(labels.index(name) if labels and name in labels else None)
        if limit and len(arrays) >= limit:
            break
    return arrays, targets, bad


def is_quantized(proto: onnx.ModelProto) -> bool:
    return any(n.op_type in INT8_OPS or n.op_type == "DequantizeLinear" for n in proto.graph.node)


def agreement(
    fp32: list[np.ndarray], int8: list[np.ndarray], targets: list[int | None]
) -> Agreement:
    a, b = np.concatenate(fp32).astype(np.float64), np.concatenate(int8).astype(np.float64)
    k = min(5, a.shape[1])
    top_a, top_b = np.argsort(-a, 1)[:, :k], np.argsort(-b, 1)[:, :k]
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    labelled = [(i, t) for i, t in enumerate(targets) if t is not None]
    accuracy = (
        (lambda top: float(np.mean([top[i, 0] == t for i, t in labelled])))
        if labelled
        else (lambda top: None)
    )
    return Agreement(
        len(a),
        float((top_a[:, 0] == top_b[:, 0]).mean()),
        float(np.mean([set(x) == set(y) for x, y in zip(top_a, top_b, strict=True)])),
        float(cos.min()),
        float(np.abs(a - b).max()),
        accuracy(top_a),
        accuracy(top_b),
    )


def lowest_sqnr(
    float_path: Path, int8_path: Path, reader: ImageReader, workdir: Path, count: int = 10
) -> list[tuple[str, float]]:
    """Tensors whose int8 values are furthest from fp32 (lowest SQNR in dB), worst first."""
    float_aug, int8_aug = workdir / "float.aug.onnx", workdir / "int8.aug.onnx"
    with quiet_libraries():
        modify_model_output_intermediate_tensors(str(float_path), str(float_aug))
        modify_model_output_intermediate_tensors(str(int8_path), str(int8_aug))
        reader.rewind()
        float_acts = collect_activations(str(float_aug), reader)
        reader.rewind()
        int8_acts = collect_activations(str(int8_aug), reader)
        errors = compute_activation_error(create_activation_matching(int8_acts, float_acts))
    scored = [
        (name, float(err["xmodel_err"]))
        for name, err in errors.items()
        if "xmodel_err" in err and np.isfinite(err["xmodel_err"])
    ]
    return sorted(scored, key=lambda item: item[1])[:count]


def _nearest_quantized(tensor: str, proto: onnx.ModelProto, excluded: set[str]) -> str | None:
    """The closest node upstream of ``tensor`` that is quantized and not yet excluded."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    frontier, seen = [tensor], set()
    while frontier:
        node = producer.get(frontier.pop(0))
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in FALLBACK_OPS and node.name not in excluded:
            return node.name
        frontier.extend(node.input)
    return None


def quantize_once(
    pre: Path,
    out: Path,
    opts: QuantOptions,
    choice: QuantChoice,
    reader: ImageReader | None,
    exclude: list[str],
    recipe: Recipe = DEFAULT_RECIPE,
) -> None:
    """One onnxruntime quantization of the prepared model ``pre`` into ``out``."""
    if opts.mode == "dynamic":
        quantize_dynamic(
            str(pre),
            str(out),
            op_types_to_quantize=list(DYNAMIC_OPS),
            per_channel=opts.per_channel,
            reduce_range=choice.reduce_range,
            weight_type=TYPES[choice.weight_type],
            nodes_to_exclude=exclude,
        )
        return
    reader.rewind()
    quantize_static(
        str(pre),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=None if recipe.op_types is None else list(recipe.op_types),
        per_channel=opts.per_channel,
        reduce_range=choice.reduce_range,
        activation_type=TYPES[choice.activation_type],
        weight_type=TYPES[choice.weight_type],
        nodes_to_exclude=exclude,
        calibrate_method=CALIBRATION_METHODS[opts.method],
        # not CalibMaxIntermediateOutputs: in onnxruntime 1.32 it drops every full chunk of
        # samples without computing their ranges (MinMaxCalibrater.collect_data)
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )


def outputs(path: Path, arrays: list[np.ndarray], threads: int | None) -> list[np.ndarray]:
    session = make_session(path, threads)
    return [run_session(session, a[None]) for a in arrays]


def latency(
    models: dict[str, Path],
    input_shape: tuple[int, ...],
    threads: int | None,
    runs: int,
    batch: int = 1,
) -> dict[str, float]:
    """Median milliseconds of each named model, all timed interleaved in one run."""
    x = np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)
    sessions = {name: make_session(path, threads, spinning=False) for name, path in models.items()}
    samples = time_interleaved(
        {k: (lambda s=s: run_session(s, x)) for k, s in sessions.items()}, warmup=3, runs=runs
    )
    return {k: float(np.median(v) * 1000) for k, v in samples.items()}


def run_quantize(
    target: Path, opts: QuantOptions, say, preprocessing: Preprocessing | None = None
) -> tuple[Path, QuantReport]:
    """Quantize the fp32 export at ``target``; writes ``model.int8.onnx`` and a report beside it."""
    from coatnet_export.inspect import resolve_model_path

    model_path = resolve_model_path(target)
    proto = load_proto(model_path)
    if is_quantized(proto):
        raise InputError(f"{model_path} is already quantized; quantize the fp32 model.onnx")
    metadata = metadata_of(proto)
    if preprocessing is None:
        if metadata is None:
            raise InputError(
                f"{model_path} has no coatnet-export metadata, so its preprocessing "
                "is unknown: pass --size H W, --mean and --std"
            )
        preprocessing = metadata.preprocessing()
    labels = metadata.labels if metadata else None
    input_name = proto.graph.input[0].name
    input_shape = (preprocessing.channels, *preprocessing.size)
    notes: list[str] = []

    calibration: list[np.ndarray] = []
    if opts.mode == "static":
        if opts.calibration_data is not None:
            calibration, _, bad = read_image_folder(
                opts.calibration_data, preprocessing, labels, limit=opts.samples
            )
            if bad:
                notes.append(f"skipped {bad} unreadable calibration file(s)")
            if not calibration:
                raise InputError(
                    f"no usable image in {opts.calibration_data}"
                    + (f" ({bad} unreadable file(s))" if bad else "")
                )
            source = f"{len(calibration)} images from {opts.calibration_data}"
        elif opts.random_calibration:
            rng = np.random.default_rng(opts.seed)
            calibration = [
                rng.standard_normal(input_shape, dtype=np.float32) for _ in range(opts.samples)
            ]
            source = f"{opts.samples} random inputs"
            notes.append(
                "calibrated on random inputs: activation ranges of noise, not of "
                "images, usually cost accuracy; use --calibration-data"
            )
        else:
            raise InputError(
                "static quantization needs --calibration-data DIR (images "
                "preprocessed like inference); or --random-calibration, which costs "
                "accuracy, or --quantize dynamic"
            )
    else:
        source = "none (dynamic quantization)"

    if opts.eval_data is not None:
        evaluation, targets, _ = read_image_folder(
            opts.eval_data, preprocessing, labels, limit=opts.eval_samples
        )
    elif opts.calibration_data is not None:
        evaluation, targets, _ = read_image_folder(
            opts.calibration_data,
            preprocessing,
            labels,
            limit=opts.eval_samples,
            skip=len(calibration),
        )
    else:
        evaluation, targets = [], []
    if not evaluation:
        rng = np.random.default_rng(opts.seed + 1)
        evaluation = [rng.standard_normal(input_shape, dtype=np.float32) for _ in range(32)]
        targets = [None] * len(evaluation)
        notes.append(
            "no held-out images (give --eval-data DIR): agreement measured on random inputs"
        )

    cpu = CpuInt8.detect()
    choice = choose_types(cpu)
    if opts.activation_type or opts.weight_type or opts.reduce_range is not None:
        choice = QuantChoice(
            opts.activation_type or choice.activation_type,
            opts.weight_type or choice.weight_type,
            choice.reduce_range if opts.reduce_range is None else opts.reduce_range,
            "set on the command line",
        )
    say(
        f"CPU {cpu.arch} [{', '.join(cpu.features) or 'no int8 features found'}]: activations "
        f"{choice.activation_type}, weights {choice.weight_type}, reduce_range "
        f"{choice.reduce_range} ({choice.reason})"
    )

    output = model_path.parent / INT8_FILE
    try:
        work_dir = tempfile.mkdtemp(prefix=".quantize-", dir=model_path.parent)
    except OSError as exc:
        raise InputError(f"{model_path.parent} is not writable ({exc.strerror or exc})") from None
    work = Path(work_dir)
    try:
        pre = work / "pre.onnx"
        say("preparing the fp32 model (quant_pre_process, spatial means as pooling)")
        prepare(model_path, pre)
        pre_proto = load_proto(pre)
        exclude = DEFAULT_RECIPE.exclusions(pre_proto) if opts.mode == "static" else []
        reader = ImageReader(input_name, calibration) if calibration else None
        reference = outputs(pre, evaluation, opts.threads)
        steps: list[list[str]] = []
        quantized = work / "int8.onnx"
        while True:
            say(
                f"quantizing ({opts.mode}"
                + (
                    f", {opts.method} calibration on {len(calibration)} samples"
                    if calibration
                    else ""
                )
                + (f", {len(steps)} fallback step(s)" if steps else "")
                + ")"
            )
            with quiet_libraries():
                quantize_once(pre, quantized, opts, choice, reader, exclude)
            compact = compact_biases(quantized)
            result = agreement(reference, outputs(quantized, evaluation, opts.threads), targets)
            say(f"top-1 agreement with fp32: {result.top1:.4f} on {result.samples} inputs")
            if (
                result.top1 >= opts.min_top1
                or opts.mode != "static"
                or len(steps) >= opts.max_fallback_steps
            ):
                break
            worst = lowest_sqnr(
                pre, quantized, ImageReader(input_name, calibration[:8]), work, count=20
            )
            excluded = set(exclude)
            step = []
            for tensor, _ in worst:
                node = _nearest_quantized(tensor, pre_proto, excluded)
                if node is not None:
                    step.append(node)
                    excluded.add(node)
                if len(step) >= opts.fallback_per_step:
                    break
            if not step:
                break
            say(f"returning to float: {', '.join(step)}")
            steps.append(step)
            exclude += step
        worst10: list[dict[str, float | str]] = []
        if opts.mode == "static":
            worst10 = [
                {"tensor": t, "sqnr_db": s}
                for t, s in lowest_sqnr(
                    pre, quantized, ImageReader(input_name, calibration[:8]), work
                )
            ]
        say(f"timing fp32 against int8 ({opts.latency_runs} interleaved runs each)")
        timings = latency(
            {"fp32": model_path, "int8": quantized}, input_shape, opts.threads, opts.latency_runs
        )
        passed = result.top1 >= opts.min_top1
        report = QuantReport(
            opts.mode,
            list(DEFAULT_RECIPE.op_types if opts.mode == "static" else DYNAMIC_OPS),
            choice,
            cpu,
            source,
            exclude,
            steps,
            result,
            {"fp32": _file_bytes(model_path), "int8": _file_bytes(quantized)},
            timings,
            timings["fp32"] / timings["int8"],
            worst10,
            compact,
            passed,
            notes,
        )
        final = onnx.load(str(quantized))
        if metadata is not None:
            metadata.quantization = metadata_quantization(report)
            write_props(final, metadata)
        onnx.save(final, str(quantized))
        quantized.replace(output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(model_path.parent / REPORT_FILE, report.as_dict())
    manifest_path = model_path.parent / "manifest.json"
    if manifest_path.is_file():  # the export's manifest lists the int8 model too
        manifest = json.loads(manifest_path.read_text())
        manifest["files"][INT8_FILE] = output.stat().st_size
        manifest["quantization"] = {"file": INT8_FILE, **metadata_quantization(report)}
        write_json(manifest_path, manifest)
    return output, report


def metadata_quantization(report: QuantReport) -> dict:
    """The summary of a quantization recorded in the int8 model and the manifest."""
    return {
        "mode": report.mode,
        "quantized_ops": report.quantized_ops,
        "activation_type": report.choice.activation_type,
        "weight_type": report.choice.weight_type,
        "reduce_range": report.choice.reduce_range,
        "reason": report.choice.reason,
        "cpu_features": list(report.cpu.features),
        "calibration": report.calibration,
        "excluded_nodes": report.excluded_nodes,
        "top1_agreement": report.agreement.top1,
    }


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
