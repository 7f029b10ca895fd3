"""int8 for large models: calibration in bounded memory, external data in and out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.external_data_helper import uses_external_data

from coatnet_export.console import Progress
from coatnet_export.export import external_data
from coatnet_export.export.pipeline import ExportOptions, run_export
from coatnet_export.quantize import source as quantize_source
from coatnet_export.quantize.calibrate import coarsen

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
CALIBRATE = """
import resource, sys, tempfile
from pathlib import Path
from coatnet_export.preprocess import Preprocessing
from coatnet_export.quantize.calibrate import Inputs, SessionPlan, calibrate_ranges
from coatnet_export.quantize.graph import DEFAULT_RECIPE, prepare

model, count, method = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with tempfile.TemporaryDirectory() as work:
    pre = Path(work) / "pre.onnx"
    prepare(model, pre)
    inputs = Inputs(Preprocessing((224, 224)), random=count)
    plan = SessionPlan(threads=1, low_memory=False, batch=1, fixed_batch=False)
    calibrate_ranges(pre, inputs, DEFAULT_RECIPE.op_types, method, plan, lambda done: None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
"""Calibrate in a fresh interpreter and print its peak RSS in bytes."""


@pytest.fixture(scope="module")
def tiny_224(tmp_path_factory) -> Path:
    """The tiny architecture at 224 x 224: about 8 MiB of activations per image, so holding
    them for every calibration input would show in the peak."""
    options = ExportOptions(
        architecture=TINY,
        output=tmp_path_factory.mktemp("tiny224") / "tiny",
        img_size=(224, 224),
        num_classes=10,
        validate=False,
    )
    return run_export(options, Progress(enabled=False)).directory / "model.onnx"


def calibration_peak(model: Path, count: int, method: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CALIBRATE, str(model), str(count), method],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_calibration_memory_does_not_grow_with_the_images(tiny_224: Path, method: str) -> None:
    # onnxruntime's own Percentile calibrator peaks at 192 MB with 8 inputs and 435 MB with 32
    # on this model; streaming keeps one input's activations at a time
    small, large = (calibration_peak(tiny_224, n, method) for n in (8, 32))
    assert large <= 1.05 * small + 16 * 2**20, (small, large)


def test_large_model_path_external_data_in_and_out(
    tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the external-data threshold lowered, a model with external weights quantizes into
    an int8 model with external weights, in low-memory sessions, and agrees with fp32."""
    monkeypatch.setattr(external_data, "EXTERNAL_DATA_THRESHOLD", 10_000)
    monkeypatch.setattr(quantize_source, "LOW_MEMORY_BYTES", 0)
    export = run_export(
        ExportOptions(
            architecture=TINY,
            output=tmp_path / "tiny",
            img_size=(64, 64),
            num_classes=10,
            validate=False,
            external_data_threshold=10_000,
        ),
        Progress(enabled=False),
    ).directory
    assert (export / "model.onnx.data").is_file()
    result = run_cli("quantize", export, "--random-calibration", "--calibration-samples", "4")
    assert result.code == 0, result.err
    int8 = export / "model.int8.onnx"
    assert (export / "model.int8.onnx.data").is_file()
    modes = {(export / name).stat().st_mode for name in ("model.int8.onnx", "model.int8.onnx.data")}
    assert len(modes) == 1  # the weights file is as readable as the model, not private
    graph = onnx.load(str(int8), load_external_data=False)
    assert any(uses_external_data(t) for t in graph.graph.initializer)
    report = json.loads((export / "quantization.json").read_text())
    assert report["files"] == ["model.int8.onnx", "model.int8.onnx.data"]
    assert report["low_memory_sessions"] and report["passed"]
    manifest = json.loads((export / "manifest.json").read_text())
    assert (
        manifest["files"]["model.int8.onnx.data"]
        == (export / "model.int8.onnx.data").stat().st_size
    )
    x = np.random.default_rng(5).standard_normal((4, 3, 64, 64), dtype=np.float32)
    fp32, q8 = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        for p in (export / "model.onnx", int8)
    )
    cosine = (fp32 * q8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(q8, axis=1)
    assert cosine.min() >= 0.99
    assert not list(export.glob(".quantize-*"))

    # quantized again above a threshold it does not reach: one file, the stale .data removed
    monkeypatch.setattr(external_data, "EXTERNAL_DATA_THRESHOLD", 1_900_000_000)
    again = run_cli("quantize", export, "--random-calibration", "--calibration-samples", "4")
    assert again.code == 0, again.err
    assert not (export / "model.int8.onnx.data").exists()
    manifest = json.loads((export / "manifest.json").read_text())
    assert "model.int8.onnx.data" not in manifest["files"]
    ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])


def test_coarsened_histograms_keep_their_counts_and_range() -> None:
    data = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    threshold = np.float32(4.0)
    hist, edges = np.histogram(data, 2 * 2 * 2 * 2 * 2 + 2, range=(-threshold, threshold))
    entry = (hist, edges.astype(np.float32), data.min(), data.max(), threshold)
    for _ in range(3):  # 34 bins (not a multiple of 4: padded) -> 18 -> 10 -> 6
        smaller = coarsen(entry)
        assert len(smaller[0]) < len(entry[0]) and smaller[0].sum() == hist.sum()
        assert smaller[4] >= entry[4] and len(smaller[1]) == len(smaller[0]) + 1
        assert smaller[1][0] == -smaller[4] and smaller[1][-1] == smaller[4]
        entry = smaller
    # each coarse bin holds the values of the fine bins it covers
    np.testing.assert_array_equal(
        np.histogram(data, len(entry[0]), range=(-entry[4], entry[4]))[0], entry[0]
    )
