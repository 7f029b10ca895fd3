#!/usr/bin/env python3
"""Classify images with a CoAtNet exported by coatnet-export, using only onnxruntime.

Needs nothing but ``pip install onnxruntime numpy pillow`` and this file: no torch.

    python infer.py model.onnx photo.jpg photos/ [--top-k 5] [--batch-size 8] [--threads 2]
    python infer.py deploy/c0 photos/ --json          # an export directory works too

Preprocessing (size, mean, std, crop, interpolation) and class names come from the model's
metadata; for a model without it, give --size H W (and --mean/--std if not ImageNet's).
Exit codes: 0 ok, 1 no usable image, 2 bad arguments or model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


# --- preprocessing: the same arithmetic as coatnet_export/preprocess.py (a test checks it) ---
@dataclass(frozen=True)
class Preprocessing:
    size: tuple[int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    @property
    def channels(self) -> int:
        return len(self.mean)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A (channels, height, width) float32 array for one decoded image."""
        image = image.convert("L" if self.channels == 1 else "RGB")
        height, width = self.size
        scale = max(height / self.crop_pct / image.height, width / self.crop_pct / image.width)
        resized_w = max(width, math.ceil(image.width * scale - 1e-6))
        resized_h = max(height, math.ceil(image.height * scale - 1e-6))
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


def open_session(model: Path, threads: int | None) -> ort.InferenceSession:
    path = model / "model.onnx" if model.is_dir() else model
    if not path.is_file():
        raise UsageError(f"model {model} not found (give an .onnx file or an export directory)")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise UsageError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None


def read_settings(
    session: ort.InferenceSession, args: argparse.Namespace
) -> tuple[Preprocessing, list[str] | None]:
    """Preprocessing and labels from the model's metadata, overridden by the arguments."""
    meta = session.get_modelmeta().custom_metadata_map
    ours = meta.get("producer") == "coatnet-export"

    def field(key: str, default):
        return json.loads(meta[key]) if ours and key in meta else default

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
    if len(mean) != len(std):
        raise UsageError(f"--mean has {len(mean)} values but --std has {len(std)}")
    return (
        Preprocessing(
            (int(size[0]), int(size[1])), tuple(mean), tuple(std), float(crop_pct), interpolation
        ),
        field("labels", None),
    )


def decode(paths: list[Path], preprocessing: Preprocessing) -> Iterator[tuple[Path, np.ndarray]]:
    """Preprocessed images; unreadable ones are reported on stderr and skipped."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                yield path, preprocessing(image)
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
    session = open_session(args.model, args.threads)
    preprocessing, labels = read_settings(session, args)
    classes = session.get_outputs()[0].shape[-1]
    if labels is not None and len(labels) != classes:
        labels = None  # names that do not fit the outputs would mislabel them
    model_input = session.get_inputs()[0]
    fixed_batch = model_input.shape[0] if isinstance(model_input.shape[0], int) else None
    batch_size = fixed_batch or args.batch_size
    paths = list_images(args.images)
    done = 0
    for names, pixels in batches(decode(paths, preprocessing), batch_size):
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
    parser.add_argument("model", type=Path, help="model.onnx (fp32 or int8) or export directory")
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--mean", type=float, nargs="+")
    parser.add_argument("--std", type=float, nargs="+")
    parser.add_argument("--crop-pct", type=float)
    parser.add_argument("--interpolation", choices=list(INTERPOLATIONS))
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return classify(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
