"""int8 for the device's CPU: target presets, the CPU check (and its copy in infer.py), and the
gate on a seeded model; all on the tiny architecture with seeded weights."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from coatnet_export.console import Progress
from coatnet_export.describe import describe, metadata_of
from coatnet_export.export.pipeline import ExportOptions, run_export
from coatnet_export.quantize import presets
from coatnet_export.quantize.presets import PRESETS, choose_types, int8_warnings

from conftest import TINY
from test_infer import load_script, run_without_torch

FAST = ("--random-calibration", "--calibration-samples", "2", "--max-fallback-steps", "0")
"""Static quantization in a second: two random calibration inputs, no fallback."""


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """The tiny architecture exported with seeded weights (metadata.seed = 0)."""
    root = tmp_path_factory.mktemp("seeded")
    options = ExportOptions(
        architecture=TINY, output=root / "tiny", img_size=(64, 64), num_classes=10, samples=1
    )
    return run_export(options, Progress(enabled=False)).directory


def fresh(seeded: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tiny"
    shutil.copytree(seeded, copy)
    return copy


def int8_types(path: Path) -> tuple[set[str], set[str], int]:
    """Activation types (QuantizeLinear zero points), weight types and the largest |weight|."""
    model = onnx.load(str(path))
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    activations = {
        constants[n.input[2]].dtype.name for n in model.graph.node if n.op_type == "QuantizeLinear"
    }
    weights = [v for k, v in constants.items() if k.endswith("weight_quantized")]
    largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    return activations, {w.dtype.name for w in weights}, largest


@pytest.mark.parametrize("target", [*PRESETS, "auto"])
def test_each_preset_gives_the_types_it_records(
    target: str, seeded: Path, tmp_path: Path, run_cli
) -> None:
    export = fresh(seeded, tmp_path)
    result = run_cli("quantize", export, *FAST, "--target-cpu", target)
    assert result.code == 0, result.err
    expected = presets.preset_for(presets.read_cpu()) if target == "auto" else PRESETS[target]
    report = json.loads((export / "quantization.json").read_text())
    recorded = metadata_of(onnx.load(str(export / "model.int8.onnx"), load_external_data=False))
    for choice in (report["choice"], recorded.quantization):
        assert choice["target_cpu"] == expected.name
        assert choice["activation_type"] == expected.activation_type
        assert choice["weight_type"] == expected.weight_type
        assert choice["reduce_range"] == expected.reduce_range
        assert choice["reason"] == expected.reason and not choice["overrides"]
    activations, weights, largest = int8_types(export / "model.int8.onnx")
    assert activations == {expected.activation_type} and weights == {expected.weight_type}
    assert (largest <= 64) == expected.reduce_range  # 7-bit weights exactly with reduce_range
    if target == "auto":
        assert f"auto = {expected.name} (this machine: " in result.err


def test_overrides_are_recorded_as_such(seeded: Path, tmp_path: Path, run_cli) -> None:
    export = fresh(seeded, tmp_path)
    result = run_cli(
        "quantize", export, *FAST, "--target-cpu", "arm64", "--activation-type", "uint8",
        "--reduce-range",
    )  # fmt: skip
    assert result.code == 0, result.err
    choice = json.loads((export / "quantization.json").read_text())["choice"]
    assert choice["target_cpu"] == "arm64"
    assert choice["overrides"] == {"activation_type": "uint8", "reduce_range": True}
    assert (choice["activation_type"], choice["reduce_range"]) == ("uint8", True)
    assert int8_types(export / "model.int8.onnx")[0] == {"uint8"}
    bad = run_cli("quantize", export, *FAST, "--activation-type", "int8", "--weight-type", "uint8")
    assert bad.code == 2 and "not supported by onnxruntime" in bad.err


def test_cpu_check_warns_where_accuracy_is_lost() -> None:
    x86_avx2 = {"arch": "x86_64", "model": "old laptop", "int8": ["avx2"]}
    x86_vnni = {"arch": "x86_64", "model": "server", "int8": ["avx512_vnni", "avx2"]}
    arm = {"arch": "arm64", "model": "board", "int8": []}
    full = {"weight_type": "int8", "reduce_range": False, "target_cpu": "x86-vnni"}
    seven_bit = {"weight_type": "int8", "reduce_range": True, "target_cpu": "x86-avx2"}
    assert "saturate" in " ".join(int8_warnings(full, x86_avx2))
    assert int8_warnings(full, x86_vnni) == [] and int8_warnings(full, arm) == []
    assert int8_warnings(seven_bit, x86_avx2) == []
    assert "7-bit" in " ".join(int8_warnings(seven_bit, x86_vnni))
    assert "7-bit" in " ".join(int8_warnings(seven_bit, arm))
    assert presets.preset_for(x86_avx2).name == "x86-avx2"
    assert presets.preset_for(arm).name == "arm64"
    assert presets.preset_for({"arch": "arm64", "int8": ["asimddp"]}).name == "arm64-dotprod"
    assert choose_types("auto", cpu=x86_avx2).detected == "old laptop, avx2"


CPUS = {
    "x86-amx": {"arch": "x86_64", "model": "xeon", "int8": ["amx_int8", "avx512_vnni", "avx2"]},
    "x86-vnni": {"arch": "x86_64", "model": "epyc", "int8": ["avx512_vnni", "avx2"]},
    "x86-avx2": {"arch": "x86_64", "model": "laptop", "int8": ["avx2"]},
    "arm64-dotprod": {"arch": "arm64", "model": "pi 5", "int8": ["asimddp"]},
    "arm64": {"arch": "arm64", "model": "pi 4", "int8": []},
}


@pytest.mark.parametrize("host", list(CPUS))
@pytest.mark.parametrize("target", list(PRESETS))
def test_the_gate_measures_as_the_target_computes(host: str, target: str) -> None:
    """Exactly (the QDQ graph unfused) where the machine that quantizes saturates and the
    target does not; on the machine's own kernels everywhere else."""
    assert presets.preset_for(CPUS[host]).name == host
    judgement = presets.judge(choose_types(target), CPUS[host])
    assert judgement.exact is (host == "x86-avx2" and target != "x86-avx2")
    assert judgement.label.startswith("exact" if judgement.exact else "this machine")
    # the preset names the fastest runtime for its class, and a recipe for each runtime
    preset = PRESETS[target]
    assert preset.runtime in ("onnxruntime", "openvino") and preset.measured
    assert {r for r, _ in preset.recipes} == {"onnxruntime", "openvino"}


def test_a_saturating_target_measured_on_a_cpu_that_does_not_saturate_says_so() -> None:
    choice = choose_types("x86-avx2", reduce_range=False)
    assert choice.saturates
    judgement = presets.judge(choice, CPUS["x86-vnni"])
    assert not judgement.exact and "optimistic" in judgement.reason
    assert not presets.judge(choice, CPUS["x86-avx2"]).exact  # both saturate alike


def test_infer_script_carries_an_exact_copy_of_the_cpu_check() -> None:
    script = load_script()
    for name in ("read_cpu", "int8_warnings"):
        assert inspect.getsource(getattr(script, name)) == inspect.getsource(
            getattr(presets, name)
        ), f"scripts/infer.py's {name} differs from coatnet_export/quantize/presets.py's"
    assert script.read_cpu() == presets.read_cpu()


def test_info_and_infer_warn_when_this_cpu_costs_accuracy(
    seeded: Path, tmp_path: Path, run_cli
) -> None:
    export = fresh(seeded, tmp_path)
    here = presets.preset_for(presets.read_cpu())
    # a model quantized for the other x86 kind than this machine's costs accuracy here
    other = "x86-avx2" if here.name == "x86-vnni" else "x86-vnni"
    if not here.name.startswith("x86"):
        pytest.skip("the check below is written for an x86 machine")
    assert run_cli("quantize", export, *FAST, "--target-cpu", other).code == 0
    warnings = int8_warnings(
        metadata_of(onnx.load(str(export / "model.int8.onnx"))).quantization, presets.read_cpu()
    )
    assert len(warnings) == 1
    assert describe(export / "model.int8.onnx")["int8_cpu_warnings"] == warnings
    info = run_cli("info", export / "model.int8.onnx")
    assert info.code == 0 and f"warning: {warnings[0]}" in info.err
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (80, 60), (200, 30, 90)).save(images / "a.png")
    inferred = run_without_torch(export / "model.int8.onnx", images)
    assert inferred.returncode == 0 and f"warning: {warnings[0]}" in inferred.stderr
    fp32 = run_without_torch(export / "model.onnx", images)
    assert "warning:" not in fp32.stderr


def test_seeded_model_is_gated_on_the_cosine_similarity(
    seeded: Path, tmp_path: Path, run_cli
) -> None:
    export = fresh(seeded, tmp_path)
    result = run_cli("quantize", export, *FAST)
    assert result.code == 0, result.err
    report = json.loads((export / "quantization.json").read_text())
    gate = report["gate"]
    assert gate["metric"] == "cosine" and "seeded weights (seed 0)" in gate["reason"]
    assert gate["value"] == report["agreement"]["min_cosine"] >= gate["threshold"] == 0.99
    assert "smallest cosine similarity" in result.err
    asked = run_cli("quantize", export, *FAST, "--gate", "top1", "--min-agreement", "0")
    assert asked.code == 0
    gate = json.loads((export / "quantization.json").read_text())["gate"]
    assert gate["metric"] == "top1" and "asked for" in gate["reason"]
    failed = run_cli("quantize", export, *FAST, "--min-cosine", "1.0")
    assert failed.code == 1 and "int8 cosine" in failed.err and "below the gate 1.0" in failed.err
    assert not json.loads((export / "quantization.json").read_text())["passed"]


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_methods(method: str, seeded: Path, tmp_path: Path, run_cli) -> None:
    export = fresh(seeded, tmp_path)
    result = run_cli("quantize", export, *FAST, "--calibration-method", method)
    assert result.code == 0, result.err
    report = json.loads((export / "quantization.json").read_text())
    assert report["calibration_method"] == method and report["passed"]


def test_fixed_batch_model_quantizes(tmp_path: Path, run_cli) -> None:
    """Calibration, held-out inputs and timing all feed a fixed-batch model whole batches."""
    options = ExportOptions(
        architecture=TINY, output=tmp_path / "fixed", img_size=(64, 64), num_classes=10,
        batch=3, validate=False,
    )  # fmt: skip
    export = run_export(options, Progress(enabled=False)).directory
    result = run_cli("quantize", export, *FAST, "--calibration-samples", "4")
    assert result.code == 0, result.err
    report = json.loads((export / "quantization.json").read_text())
    assert report["agreement"]["samples"] == 32 and report["passed"]
