#!/usr/bin/env python3
"""Classify images with a CoAtNet exported by coatnet-export, using only onnxruntime.

Needs nothing but ``pip install onnxruntime numpy pillow`` and this file: no torch.

    python infer.py model.onnx photo.jpg photos/ [--top-k 5] [--batch-size 8] [--threads 2]
    python infer.py deploy/c0 photos/ --json          # an export directory works too
    python infer.py deploy/c0 photos/ --runtime openvino   # also needs: pip install openvino

OpenVINO is imported only with ``--runtime openvino`` (f32 unless ``--precision bf16``); it
cannot run e2e models (its CPU plugin computes their preprocessing in single precision).

Preprocessing (size, mean, std, crop, interpolation, crop mode) and class names come from the
model's metadata; for a model without it, give --size H W (and --mean/--std if not ImageNet's).
An e2e model (``coatnet-export package DIR --target e2e``: uint8 RGB [1, H, W, 3] in) gets the
decoded pixels as they are, one image at a time: its preprocessing is inside the graph.
Exit codes: 0 ok, 1 no usable image, 2 bad arguments or model.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
CROP_MODES = ("center", "squash")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


# --- preprocessing: the same arithmetic as coatnet_export/preprocess.py (a test checks it) ---
@dataclass(frozen=True)
class Preprocessing:
    size: tuple[int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    crop_mode: str = "center"
    """center: keep the aspect ratio, cover size / crop_pct; squash: each axis to
    floor(size / crop_pct). Then a centre crop to size."""

    @property
    def channels(self) -> int:
        return len(self.mean)

    def resized_size(self, image_height: int, image_width: int) -> tuple[int, int]:
        """(height, width) the image is resized to before the centre crop."""
        height, width = self.size
        if self.crop_mode == "squash":
            return math.floor(height / self.crop_pct), math.floor(width / self.crop_pct)
        scale = max(height / self.crop_pct / image_height, width / self.crop_pct / image_width)
        return (
            max(height, math.ceil(image_height * scale - 1e-6)),
            max(width, math.ceil(image_width * scale - 1e-6)),
        )

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A (channels, height, width) float32 array for one decoded image."""
        image = image.convert("L" if self.channels == 1 else "RGB")
        height, width = self.size
        resized_h, resized_w = self.resized_size(image.height, image.width)
        image = image.resize((resized_w, resized_h), INTERPOLATIONS[self.interpolation])
        left, top = (resized_w - width) // 2, (resized_h - height) // 2
        image = image.crop((left, top, left + width, top + height))
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return ((pixels - mean) / std).transpose(2, 0, 1).copy()


class UsageError(Exception):
    """Bad arguments or model: exit code 2."""


# --- int8: does this CPU suit the model's recorded target? A copy of two functions of
# coatnet_export/quantize/presets.py (tests/test_quantize_presets.py checks they are equal) ---
def read_cpu() -> dict:
    """This machine's CPU as its int8 kernels see it: {"arch": "x86_64" | "arm64" | ...,
    "model": name, "int8": [the int8 features found: amx_int8, avx512_vnni, avx_vnni, avx2,
    asimddp]}.

    The instruction sets come from numpy's runtime dispatch (cpuid on x86, the kernel's HWCAP
    on arm64), which is what onnxruntime's own detection reads too, so a CPU emulated by
    ``qemu -cpu MODEL`` is seen as the emulated one; /proc/cpuinfo (the host's, under qemu)
    adds only what numpy does not report, AVX-VNNI and AMX, where numpy confirms the
    instruction set they extend."""
    import platform

    arch = platform.machine().lower()
    arch = {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "armv8l": "arm64"}.get(
        arch, arch
    )
    model, flags = platform.processor() or arch, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags.update(value.split())
                elif key.strip() == "model name":
                    model = value.strip()
    except OSError:  # not Linux
        pass
    try:
        umath = importlib.import_module("numpy._core._multiarray_umath")
    except ImportError:  # numpy < 2
        umath = importlib.import_module("numpy.core._multiarray_umath")
    isa = umath.__cpu_features__
    found = {
        "amx_int8": isa.get("AVX512VNNI") and "amx_int8" in flags,
        "avx512_vnni": isa.get("AVX512VNNI"),
        "avx_vnni": isa.get("AVX2") and "avx_vnni" in flags,
        "avx2": isa.get("AVX2"),
        "asimddp": isa.get("ASIMDDP"),
    }
    return {"arch": arch, "model": model, "int8": [f for f, there in found.items() if there]}


def int8_warnings(quantization: dict, cpu: dict) -> list[str]:
    """Ways in which running a model quantized as ``quantization`` (its recorded metadata) on
    ``cpu`` (from read_cpu) costs accuracy; empty when the CPU suits the model."""
    weight_type = quantization.get("weight_type")
    reduce_range = quantization.get("reduce_range")
    target = quantization.get("target_cpu", "an unrecorded CPU")
    vnni = "avx512_vnni" in cpu["int8"] or "avx_vnni" in cpu["int8"]
    warnings = []
    if cpu["arch"] == "x86_64" and not vnni and weight_type == "int8" and reduce_range is False:
        warnings.append(
            f"this CPU ({cpu['model']}) has no VNNI: onnxruntime adds pairs of 8-bit products "
            f"in 16 bits here, which can saturate with the full-range int8 weights of this "
            f"model (quantized for {target}); re-quantize with --target-cpu x86-avx2 to deploy "
            "on it"
        )
    if reduce_range and (vnni or cpu["arch"] == "arm64"):
        warnings.append(
            f"this model keeps 7-bit weights (reduce_range, quantized for {target}), which "
            f"this CPU ({cpu['model']}) does not need: re-quantize with --target-cpu auto on "
            "it for full 8-bit weights"
        )
    return warnings


def warn_int8_target(session: ort.InferenceSession, runtime: str) -> None:
    """On stderr: an int8 model laid out for another runtime (it runs, slower), and in
    onnxruntime the ways this CPU costs it accuracy (see int8_warnings)."""
    recorded = session.get_modelmeta().custom_metadata_map.get("quantization")
    try:
        quantization = json.loads(recorded) if recorded else None
    except json.JSONDecodeError:
        return
    if not isinstance(quantization, dict):
        return
    laid_out_for = quantization.get("laid_out_for", "onnxruntime")
    if laid_out_for != runtime:
        print(
            f"warning: this int8 model is laid out for {laid_out_for}: {runtime} runs it, but "
            f"slower (quantize with --runtime {runtime} for a model laid out for it)",
            file=sys.stderr,
        )
    if runtime == "onnxruntime":  # the CPU warnings describe onnxruntime's int8 kernels
        for warning in int8_warnings(quantization, read_cpu()):
            print(f"warning: {warning}", file=sys.stderr)


def list_images(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                sorted(
                    p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                )
            )
        else:
            found.append(path)
    return found


OPENVINO_TYPES = {"f32": "float", "f16": "float16", "u8": "uint8", "i8": "int8", "i64": "int64"}
"""OpenVINO element types as onnxruntime names them."""


class OpenVinoSession:
    """The parts of onnxruntime's InferenceSession this script uses, for a model compiled by
    OpenVINO's CPU plugin (``--runtime openvino``: the only place openvino is imported)."""

    def __init__(self, path: Path, threads: int | None, precision: str) -> None:
        try:
            import openvino
        except ImportError:
            raise UsageError("--runtime openvino needs OpenVINO (pip install openvino)") from None
        core = openvino.Core()
        try:
            model = core.read_model(str(path))
        except RuntimeError as exc:
            raise UsageError(f"OpenVINO cannot load {path}: {self.reason(exc)}") from None
        self.inputs, self.outputs = map(self.node_args, (model.inputs, model.outputs))
        if self.inputs and is_e2e(self.inputs[0]):
            raise UsageError(
                f"OpenVINO cannot run the e2e model {path}: its CPU plugin computes the "
                "graph's preprocessing in single precision (use --runtime onnxruntime, or "
                "model.onnx)"
            )
        meta = model.get_rt_info()["framework"] if model.has_rt_info("framework") else {}
        self.metadata = {key: value.astype(str) for key, value in meta.items()}
        config: dict[str, object] = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.request = core.compile_model(model, "CPU", config).create_infer_request()
        except RuntimeError as exc:
            raise UsageError(f"OpenVINO cannot compile {path}: {self.reason(exc)}") from None

    @staticmethod
    def reason(exc: Exception) -> str:
        """The telling line of an OpenVINO error (its first lines name C++ source files)."""
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        useful = [line for line in lines if not line.startswith(("Exception from", "Check "))]
        return (useful or lines or [type(exc).__name__])[-1]

    @staticmethod
    def node_args(ports) -> list[SimpleNamespace]:
        """onnxruntime-style NodeArgs: name, shape (None for a dynamic axis), type."""
        return [
            SimpleNamespace(
                name=port.get_any_name(),
                shape=[d.get_length() if d.is_static else None for d in port.get_partial_shape()],
                type=f"tensor({OPENVINO_TYPES.get(port.get_element_type().get_type_name())})",
            )
            for port in ports
        ]

    def get_inputs(self) -> list[SimpleNamespace]:
        return self.inputs

    def get_outputs(self) -> list[SimpleNamespace]:
        return self.outputs

    def get_modelmeta(self) -> SimpleNamespace:
        return SimpleNamespace(custom_metadata_map=self.metadata)

    def run(self, output_names: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:  # the result is the request's own buffer, overwritten by the next call: copied
            return [self.request.infer(list(feeds.values()))[0].copy()]
        except RuntimeError as exc:
            raise UsageError(f"OpenVINO failed: {self.reason(exc)}") from None


def open_session(
    model: Path, threads: int | None, runtime: str = "onnxruntime", precision: str = "f32"
) -> ort.InferenceSession | OpenVinoSession:
    path = model / "model.onnx" if model.is_dir() else model
    if not path.is_file():
        raise UsageError(f"model {model} not found (give an .onnx file or an export directory)")
    if runtime == "openvino":
        session = OpenVinoSession(path, threads, precision)
    else:
        session = ort_session(path, threads)
    if len(session.get_inputs()) != 1:
        names = ", ".join(i.name for i in session.get_inputs())
        raise UsageError(f"{path} has inputs {names}; an image classifier takes exactly one")
    return session


def ort_session(path: Path, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise UsageError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None
    return session


def read_settings(
    session: ort.InferenceSession, args: argparse.Namespace
) -> tuple[Preprocessing, list[str] | None]:
    """Preprocessing and labels from the model's metadata, overridden by the arguments."""
    meta = session.get_modelmeta().custom_metadata_map
    ours = meta.get("producer") == "coatnet-export"

    def field(key: str, default):
        if not ours or key not in meta:
            return default
        try:
            return json.loads(meta[key])
        except json.JSONDecodeError:
            raise UsageError(
                f"the model's coatnet-export metadata is damaged: {key} is not valid JSON "
                "(re-export the model)"
            ) from None

    size = args.size or field("img_size", None)
    if size is None:
        raise UsageError(
            "the model has no coatnet-export metadata: give --size H W (and --mean "
            "and --std if it was not trained with ImageNet's)"
        )
    mean = args.mean or field("mean", IMAGENET_MEAN)
    std = args.std or field("std", IMAGENET_STD)
    crop_pct = args.crop_pct or field("crop_pct", 0.875)
    interpolation = args.interpolation or (meta.get("interpolation") if ours else None) or "bicubic"
    crop_mode = args.crop_mode or (meta.get("crop_mode") if ours else None) or "center"
    check_preprocessing(session, size, mean, std, crop_pct)
    if interpolation not in INTERPOLATIONS or crop_mode not in CROP_MODES:
        raise UsageError(
            f"the model's metadata asks for interpolation {interpolation!r} and crop_mode "
            f"{crop_mode!r}, which this script does not know (use a newer infer.py, or give "
            "--interpolation and --crop-mode)"
        )
    return (
        Preprocessing(
            (int(size[0]), int(size[1])),
            tuple(mean),
            tuple(std),
            float(crop_pct),
            interpolation,
            crop_mode,
        ),
        field("labels", None),
    )


def check_preprocessing(session: ort.InferenceSession, size, mean, std, crop_pct) -> None:
    """Settings (from arguments or metadata) must be numbers that fit the model's input."""
    if not all(isinstance(v, (list, tuple)) for v in (size, mean, std)):
        raise UsageError("size, mean and std must be lists of numbers (re-export the model)")
    numbers = [*size, *mean, *std, crop_pct]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
        raise UsageError("size, mean, std and crop_pct must be finite numbers")
    if len(size) != 2 or min(size) < 1 or not std or min(std) <= 0 or not 0 < crop_pct <= 1:
        raise UsageError("size must be two positive integers, std positive, crop_pct in (0, 1]")
    if len(mean) != len(std):
        raise UsageError(f"--mean has {len(mean)} values but --std has {len(std)}")
    shape = session.get_inputs()[0].shape
    if len(shape) == 4 and isinstance(shape[1], int) and shape[1] != len(mean):
        raise UsageError(
            f"--mean/--std give {len(mean)} value(s) but the model takes {shape[1]} channel(s)"
        )
    spatial = tuple(shape[2:]) if len(shape) == 4 else ()
    if all(isinstance(d, int) for d in spatial) and spatial not in ((), (size[0], size[1])):
        raise UsageError(f"--size {size[0]} {size[1]} does not fit the model's input {spatial}")


def is_e2e(model_input: ort.NodeArg) -> bool:
    """An e2e model takes uint8 RGB pixels [1, H, W, 3] and preprocesses them itself."""
    shape = model_input.shape
    return model_input.type == "tensor(uint8)" and len(shape) == 4 and shape[3] == 3


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """An e2e model's input for one image: the decoded pixels as uint8 RGB [H, W, 3]."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_labels(session: ort.InferenceSession) -> list[str] | None:
    """Class names from the model's metadata, if it has them."""
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("producer") != "coatnet-export" or "labels" not in meta:
        return None
    try:
        return json.loads(meta["labels"])
    except json.JSONDecodeError:
        return None


def decode(
    paths: list[Path], convert: Callable[[Image.Image], np.ndarray]
) -> Iterator[tuple[Path, np.ndarray]]:
    """Model inputs of the images; unreadable ones are reported on stderr and skipped."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                # upright as the EXIF orientation says (as browsers and viewers show photos)
                yield path, convert(ImageOps.exif_transpose(image))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"skipped {path}: {reason}", file=sys.stderr)


def batches(
    items: Iterator[tuple[Path, np.ndarray]], size: int
) -> Iterator[tuple[list[Path], np.ndarray]]:
    paths, arrays = [], []
    for path, array in items:
        paths.append(path)
        arrays.append(array)
        if len(arrays) == size:
            yield paths, np.stack(arrays)
            paths, arrays = [], []
    if arrays:
        yield paths, np.stack(arrays)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def classify(args: argparse.Namespace) -> int:
    session = open_session(args.model, args.threads, args.runtime, args.precision)
    warn_int8_target(session, args.runtime)
    model_input = session.get_inputs()[0]
    if is_e2e(model_input):
        settings = (args.size, args.mean, args.std, args.crop_pct, args.interpolation)
        if any(settings) or args.crop_mode:
            raise UsageError(
                "the e2e model preprocesses in its graph: --size, --mean, --std, --crop-pct, "
                "--interpolation and --crop-mode do not apply"
            )
        convert, labels = rgb_pixels, read_labels(session)
    else:
        convert, labels = read_settings(session, args)
    classes = session.get_outputs()[0].shape[-1]
    if labels is not None and len(labels) != classes:
        labels = None  # names that do not fit the outputs would mislabel them
    fixed_batch = model_input.shape[0] if isinstance(model_input.shape[0], int) else None
    batch_size = fixed_batch or args.batch_size
    paths = list_images(args.images)
    done = 0
    for names, pixels in batches(decode(paths, convert), batch_size):  # e2e: fixed batch 1
        count = len(names)
        if fixed_batch and count < fixed_batch:  # pad a fixed-batch model's last batch
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], fixed_batch - count, 0)])
        probabilities = softmax(session.run(None, {model_input.name: pixels})[0][:count])
        for name, probs in zip(names, probabilities, strict=True):
            top = np.argsort(-probs)[: args.top_k]
            ranked = [
                {
                    "index": int(i),
                    "label": labels[i] if labels else str(int(i)),
                    "probability": float(probs[i]),
                }
                for i in top
            ]
            if args.json:
                print(json.dumps({"image": str(name), "top_k": ranked}))
            else:
                print(name)
                for entry in ranked:
                    print(f"  {entry['probability']:.4f}  {entry['label']}")
        done += count
    if done == 0:
        print(f"error: no usable image among {len(paths)} file(s)", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", type=Path, help="model.onnx (fp32, int8 or e2e) or export directory"
    )
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--runtime",
        choices=("onnxruntime", "openvino"),
        default="onnxruntime",
        help="openvino needs: pip install openvino",
    )
    parser.add_argument(
        "--precision", choices=("f32", "bf16"), default="f32", help="OpenVINO's precision"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--mean", type=float, nargs="+")
    parser.add_argument("--std", type=float, nargs="+")
    parser.add_argument("--crop-pct", type=float)
    parser.add_argument("--interpolation", choices=list(INTERPOLATIONS))
    parser.add_argument(
        "--crop-mode",
        choices=CROP_MODES,
        help="center: keep the aspect ratio and centre crop; squash: stretch to the size",
    )
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be positive")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.precision != "f32" and args.runtime != "openvino":
        parser.error("--precision bf16 needs --runtime openvino")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return classify(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # onnxruntime's own types: a model that does not fit the input
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        print(f"error: onnxruntime failed: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
