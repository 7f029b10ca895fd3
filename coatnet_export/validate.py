"""Parity between the PyTorch reference and the exported model in onnxruntime or OpenVINO."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from coatnet_export.errors import InputError
from coatnet_export.gates import RESULT_COLUMNS, Gates  # noqa: F401 (validate's, as before)
from coatnet_export.preprocess import Preprocessing, list_images, load_images
from coatnet_export.runtimes import RunOptions, load_model

if TYPE_CHECKING:  # torch loads when a reference runs, not when the command line starts
    import torch


@dataclass
class Case:
    """One input batch and the reference outputs for it."""

    name: str
    inputs: np.ndarray
    reference: np.ndarray | None = None
    gates: Gates | None = None
    """Gates of this case, where they differ from the run's."""


@dataclass
class CaseResult:
    """Agreement of one case between the reference and the candidate outputs."""

    case: str
    batch: int
    max_abs: float
    max_rel: float
    mean_abs: float
    min_cosine: float
    top1: float
    top5: float
    nonfinite: int
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def random_cases(
    in_channels: int,
    img_size: tuple[int, int],
    seed: int,
    samples: int,
    batch: int | None,
    large_batch: int,
) -> list[Case]:
    """``samples`` single inputs and one batch of ``large_batch`` (or exactly ``batch`` each)."""
    rng = np.random.default_rng(seed)
    shape = (in_channels, *img_size)
    single = batch or 1
    cases = [
        Case(f"random #{i + 1}", rng.standard_normal((single, *shape), dtype=np.float32))
        for i in range(samples)
    ]
    if batch is None and large_batch > 1:
        cases.append(
            Case(
                f"random batch of {large_batch}",
                rng.standard_normal((large_batch, *shape), dtype=np.float32),
            )
        )
    return cases


def image_cases(images: list[np.ndarray], batch: int | None, large_batch: int) -> list[Case]:
    """Real images, grouped into batches (padded by repetition to a fixed batch size)."""
    size = batch or max(1, large_batch)
    cases = []
    for start in range(0, len(images), size):
        group = images[start : start + size]
        if batch is not None:
            group = group + [group[-1]] * (batch - len(group))
        cases.append(
            Case(f"images {start + 1}-{start + len(images[start : start + size])}", np.stack(group))
        )
    return cases


def build_cases(
    in_channels: int,
    img_size: tuple[int, int],
    seed: int,
    samples: int,
    batch: int | None,
    large_batch: int,
    image_paths: list[Path],
    preprocessing: Preprocessing,
) -> tuple[list[Case], list[str]]:
    """Random cases plus cases of real images; returns the cases and the unreadable images."""
    images, skipped = [], []
    for path, array, reason in load_images(list_images(image_paths), preprocessing):
        if array is None:
            skipped.append(f"{path}: {reason}")
        else:
            images.append(array)
    if image_paths and not images:
        raise InputError(
            f"no readable image in {', '.join(map(str, image_paths))}"
            + (f" ({len(skipped)} unreadable)" if skipped else "")
        )
    cases = random_cases(in_channels, img_size, seed, samples, batch, large_batch)
    return cases + image_cases(images, batch, large_batch), skipped


RECORDED_GATES = Gates(max_rel_error=1e-5, min_top1=1.0)
"""Gates against outputs recorded in the training framework (float32 ONNX vs its own numerics)."""


def nothing_to_validate(
    samples: int, batch: int | None, large_batch: int, images: list[Path], recorded: bool
) -> bool:
    """True when these settings would validate no case at all (a vacuous pass)."""
    return samples == 0 and not images and not recorded and not (batch is None and large_batch > 1)


NOTHING_TO_VALIDATE = (
    "nothing to validate: --samples 0 with a fixed --batch and no --images (give --samples 1 "
    "or more, or --images; or pass --no-validate to skip validation knowingly)"
)


def read_recorded(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``x`` (float32) and outputs ``y`` of an ``.npz``; every damage is an InputError."""
    usage = f"reference outputs {path} must be an .npz with float arrays 'x' (N, C, H, W) and 'y'"
    if not zipfile.is_zipfile(path):
        reason = "it does not exist" if not path.exists() else "it is not an .npz (zip) archive"
        raise InputError(f"{usage} ({reason})")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in ("x", "y") if name not in data.files]
            if missing:
                raise InputError(f"{usage} (it has no array {', '.join(map(repr, missing))})")
            x, y = np.asarray(data["x"]), np.asarray(data["y"])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputError(f"{usage} (it is damaged or truncated: {exc})") from None
    for name, array in (("x", x), ("y", y)):
        if array.dtype.kind not in "fiu":
            raise InputError(f"{usage} ({name} has dtype {array.dtype}, not real numbers)")
        if not np.isfinite(array).all():
            raise InputError(f"{usage} ({name} holds NaN or infinite values)")
    return x.astype(np.float32), y


def recorded_case(
    path: Path,
    arrays: tuple[np.ndarray, np.ndarray],
    in_channels: int,
    img_size: tuple[int, int],
    num_classes: int,
    batch: int | None,
) -> Case:
    """A case whose reference comes from recorded inputs ``x`` and outputs ``y`` (see
    :func:`read_recorded`), checked against the model's input and output shapes."""
    x, y = arrays
    expected = (in_channels, *img_size)
    if x.ndim != 4 or x.shape[1:] != expected or y.shape != (x.shape[0], num_classes):
        raise InputError(
            f"reference outputs {path}: x {x.shape} and y {y.shape} do not fit a "
            f"model taking (N, {', '.join(map(str, expected))}) and giving "
            f"(N, {num_classes})"
        )
    if x.shape[0] == 0:
        raise InputError(f"reference outputs {path} hold no inputs (x has 0 rows)")
    if batch is not None and x.shape[0] != batch:
        raise InputError(
            f"reference outputs {path} hold {x.shape[0]} inputs but the export has "
            f"a fixed batch of {batch}"
        )
    return Case(f"recorded outputs ({path.name})", x, y, RECORDED_GATES)


def add_reference_outputs(model: torch.nn.Module, cases: list[Case]) -> None:
    """Fill each case's reference from the PyTorch model (before any export rewrite), one
    image at a time: the reference of an image does not depend on its batch, and the eager
    model's activations (large at 384 x 384) are then held for one image only."""
    import torch

    with torch.no_grad():
        for case in cases:
            if case.reference is None:
                outputs = [model(torch.from_numpy(image[None])) for image in case.inputs]
                case.reference = torch.cat(outputs).float().numpy()


def compare(name: str, reference: np.ndarray, actual: np.ndarray, gates: Gates) -> CaseResult:
    """Error statistics and top-k agreement of ``actual`` against ``reference`` logits."""
    reference = reference.astype(np.float64)
    actual = actual.astype(np.float64)
    nonfinite = int((~np.isfinite(actual)).sum())
    diff = np.abs(actual - reference)
    scale = max(float(np.abs(reference).max()), 1e-12)
    dot = (reference * actual).sum(axis=1)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(actual, axis=1)
    cosine = np.where(norms > 0, dot / np.maximum(norms, 1e-300), 0.0)
    k = min(5, reference.shape[1])
    top_ref = np.argsort(-reference, axis=1)[:, :k]
    top_act = np.argsort(-actual, axis=1)[:, :k]
    top1 = float((top_ref[:, 0] == top_act[:, 0]).mean())
    top5 = float(np.mean([set(a) == set(b) for a, b in zip(top_ref, top_act, strict=True)]))
    max_abs = float(diff.max()) if nonfinite == 0 else float("inf")
    max_rel = max_abs / scale
    passed = nonfinite == 0 and max_rel <= gates.max_rel_error and top1 >= gates.min_top1
    return CaseResult(
        name,
        reference.shape[0],
        max_abs,
        max_rel,
        float(diff.mean()),
        float(cosine.min()),
        top1,
        top5,
        nonfinite,
        passed,
    )


def validate_onnx(
    path: Path,
    cases: list[Case],
    gates: Gates,
    threads: int | None = None,
    low_memory: bool = False,
    runtime: str = "onnxruntime",
    precision: str = "f32",
) -> list[CaseResult]:
    """Run every case through ``runtime`` and compare with its reference outputs."""
    if not cases:
        raise InputError(NOTHING_TO_VALIDATE)
    options = RunOptions(threads, low_memory=low_memory, precision=precision)
    model = load_model(path, runtime, options)
    results = []
    for case in cases:
        if case.reference is None:
            raise ValueError(f"validation case {case.name} has no reference outputs")
        results.append(
            compare(case.name, case.reference, model.run(case.inputs), case.gates or gates)
        )
    del model
    return results
