"""What both predict engines share: the model spec, input listing, decoding, top-k rows, progress.

A row per image: ``path``, ``top_k_indices``, ``top_k_labels``, ``top_k_probabilities``,
``model_sha256`` and ``error`` (null, or why the image could not be classified). Preprocessing
and labels come from the model's coatnet-export metadata, so rows equal ``scripts/infer.py``'s.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from coatnet_export.describe import load_proto, metadata_of, resolve_model_path
from coatnet_export.errors import InputError
from coatnet_export.layout import MODELS, data_file
from coatnet_export.preprocess import IMAGE_SUFFIXES, Preprocessing, open_image

GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything a worker needs to classify images with one model (picklable)."""

    path: str
    sha256: str
    preprocessing: Preprocessing
    labels: tuple[str, ...]
    fixed_batch: int | None
    top_k: int


def file_sha256(paths: Sequence[Path]) -> str:
    """One SHA-256 over the bytes of ``paths`` in order (the model, then its .data file)."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def load_spec(export: Path, model: str, top_k: int) -> ClassifierSpec:
    """The spec of ``export``'s fp32 or int8 model (or of an .onnx file given directly)."""
    path = resolve_model_path(export, MODELS[model])
    proto = load_proto(path)
    metadata = metadata_of(proto)
    if metadata is None:
        raise InputError(
            f"{path} has no coatnet-export metadata, so its preprocessing is unknown "
            "(predict takes models exported by coatnet-export)"
        )
    output_dims = proto.graph.output[0].type.tensor_type.shape.dim
    classes = output_dims[-1].dim_value or metadata.num_classes
    labels = metadata.labels if metadata.labels and len(metadata.labels) == classes else None
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    files = [path, data_file(path)] if data_file(path).exists() else [path]
    return ClassifierSpec(
        path=str(path),
        sha256=file_sha256(files),
        preprocessing=metadata.preprocessing(),
        labels=tuple(labels or (str(i) for i in range(classes))),
        fixed_batch=batch_dim.dim_value or None,
        top_k=min(top_k, classes),
    )


# --- inputs -------------------------------------------------------------------------------


def is_uri(text: str) -> bool:
    """A URI another filesystem reads (s3://, gs://, ...); file:// counts as a local path."""
    return "://" in text and not text.startswith("file://")


def _local(text: str) -> str:
    return text.removeprefix("file://")


def check_inputs(inputs: Sequence[str], allow_uris: bool) -> None:
    """Fail before anything runs if an input does not exist or a glob matches nothing."""
    if not inputs:
        raise InputError("no inputs given (give image files, folders or glob patterns)")
    for text in inputs:
        if is_uri(text):
            if not allow_uris:
                raise InputError(
                    f"{text} is a URI; the local engine reads local files only (use --engine ray)"
                )
            continue
        path = _local(text)
        if any(c in path for c in GLOB_CHARS) and not os.path.exists(path):
            if not glob.glob(path, recursive=True):
                raise InputError(f"the pattern {text} matches no file")
        elif not os.path.exists(path):
            raise InputError(f"input {text} does not exist (give image files, folders or globs)")


def _walk_images(folder: str) -> Iterator[str]:
    """Image files under ``folder``, in sorted order, one directory at a time."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_SUFFIXES):
                yield os.path.join(root, name)


def _walk_uri(uri: str) -> Iterator[str]:
    """Image files under a URI (or the URI itself if it names a file), via pyarrow's filesystems."""
    from pyarrow import fs

    try:
        filesystem, root = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(root)
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
        raise InputError(f"cannot read {uri} ({exc})") from None
    scheme = uri.split("://", 1)[0]
    if info.type == fs.FileType.File:
        yield uri
        return
    if info.type != fs.FileType.Directory:
        raise InputError(f"input {uri} does not exist")
    selector = fs.FileSelector(root, recursive=True)
    found = filesystem.get_file_info(selector)
    for entry in sorted(found, key=lambda e: e.path):
        if entry.type == fs.FileType.File and entry.path.lower().endswith(IMAGE_SUFFIXES):
            yield f"{scheme}://{entry.path}"


def iter_images(inputs: Sequence[str]) -> Iterator[str]:
    """Every image named by ``inputs``: files as given, folders walked, globs expanded.

    Local paths are made absolute (so a resumed run recognises them); URIs stay URIs.
    """
    for text in inputs:
        if is_uri(text):
            yield from _walk_uri(text)
            continue
        path = _local(text)
        if any(c in path for c in GLOB_CHARS) and not os.path.exists(path):
            matches = sorted(glob.glob(path, recursive=True))
        else:
            matches = [path]
        for match in matches:
            if os.path.isdir(match):
                yield from (os.path.abspath(p) for p in _walk_images(match))
            else:
                yield os.path.abspath(match)


# --- classification -----------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def decode(data: bytes, preprocessing: Preprocessing) -> tuple[np.ndarray | None, str | None]:
    """(model input, None) for an image file's bytes, or (None, why it cannot be used)."""
    try:
        return preprocessing(open_image(io.BytesIO(data))), None
    except UnidentifiedImageError:
        return None, "not an image file Pillow can read"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return None, _reason(exc)


def read_file(path: str) -> tuple[bytes | None, str | None]:
    """A local file's bytes, or (None, why it cannot be read)."""
    try:
        return Path(path).read_bytes(), None
    except OSError as exc:
        return None, f"cannot read the file ({exc.strerror or _reason(exc)})"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Classifier:
    """One onnxruntime session classifying preprocessed images into top-k rows."""

    def __init__(self, spec: ClassifierSpec, threads: int) -> None:
        from coatnet_export.runtimes import RunOptions, load_model

        self.spec = spec
        self.model = load_model(Path(spec.path), "onnxruntime", RunOptions(threads=threads))

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities for a stack of inputs (padded to a fixed-batch model's batch)."""
        fixed, count = self.spec.fixed_batch, len(pixels)
        chunks = []
        step = fixed or count
        for start in range(0, count, step):
            chunk = pixels[start : start + step]
            if fixed and len(chunk) < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - len(chunk), 0)])
            chunks.append(softmax(self.model.run(chunk))[: min(step, count - start)])
        return np.concatenate(chunks)

    def rows(
        self,
        paths: Sequence[str],
        arrays: Sequence[np.ndarray | None],
        errors: Sequence[str | None],
    ) -> list[dict]:
        """One row per path: top-k for decoded images, the error for the others."""
        good = [i for i, array in enumerate(arrays) if array is not None]
        decoded = [array for array in arrays if array is not None]
        probs = list(self.probabilities(np.stack(decoded))) if decoded else []
        ranked = dict(zip(good, probs, strict=True))
        return [self.row(path, ranked.get(i), errors[i]) for i, path in enumerate(paths)]

    def row(self, path: str, probs: np.ndarray | None, error: str | None) -> dict:
        spec = self.spec
        if probs is None:
            return empty_row(path, spec.sha256, error or "not classified")
        top = np.argsort(-probs)[: spec.top_k]
        return {
            "path": path,
            "top_k_indices": [int(i) for i in top],
            "top_k_labels": [spec.labels[i] for i in top],
            "top_k_probabilities": [float(probs[i]) for i in top],
            "model_sha256": spec.sha256,
            "error": None,
        }


def empty_row(path: str, sha256: str, error: str) -> dict:
    """The row of an image that could not be classified."""
    return {
        "path": path,
        "top_k_indices": None,
        "top_k_labels": None,
        "top_k_probabilities": None,
        "model_sha256": sha256,
        "error": error,
    }


# --- progress and summary -----------------------------------------------------------------


@dataclass
class Meter:
    """Counts rows as they are written; a progress note every ``every`` seconds."""

    engine: str
    workers: int
    threads: int
    note: Callable[[str], None]
    images: int = 0
    errors: int = 0
    every: float = 2.0
    start: float = field(default_factory=time.perf_counter)
    last: float = field(default_factory=time.perf_counter)

    def restart(self) -> None:
        """Start the clock again (after starting Ray: images/s measures the classification)."""
        self.start = self.last = time.perf_counter()

    def add(self, images: int, errors: int) -> None:
        self.images += images
        self.errors += errors
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.note(
                f"{self.images} images ({self.errors} errors), "
                f"{self.images / (now - self.start):.1f} images/s"
            )

    def summary(self) -> dict:
        wall = time.perf_counter() - self.start
        return {
            "engine": self.engine,
            "workers": self.workers,
            "threads_per_worker": self.threads,
            "images": self.images,
            "errors": self.errors,
            "images_per_s": self.images / wall if wall > 0 else 0.0,
            "wall_s": wall,
        }
