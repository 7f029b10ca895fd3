"""int8 quantization on the trained digits fixture: accuracy, gate, fallback, report, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from coatnet_export.console import Progress
from coatnet_export.describe import metadata_of
from coatnet_export.export.pipeline import ExportOptions, run_export
from coatnet_export.quantize.graph import (
    DEFAULT_RECIPE,
    OPENVINO_RECIPE,
    RECIPES,
    attention_as_matmuls,
    compact_biases,
    non_gate_muls,
    prepare,
)
from models import VariantSpec

from conftest import export_digits, listing

FIXTURE = Path(__file__).parent / "fixtures" / "digits"

DIGITS = VariantSpec("digits", (1, 1, 2, 2, 1), (16, 24, 32, 48, 64), num_heads=2)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """The trained fixture exported to ONNX, and calibration / held-out image folders."""
    return export_digits(tmp_path_factory.mktemp("digits"))


def fresh_export(digits: dict[str, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "export"
    shutil.copytree(digits["export"], copy)
    return copy


def test_static_quantization_meets_the_accuracy_targets(tmp_path: Path, digits, run_cli) -> None:
    export = fresh_export(digits, tmp_path)
    result = run_cli(
        "quantize",
        export,
        "--calibration-data",
        digits["calibration"],
        "--eval-data",
        digits["test"],
    )
    assert result.code == 0, result.err
    report = json.loads((export / "quantization.json").read_text())
    agreement = report["agreement"]
    assert agreement["samples"] == 360
    assert agreement["top1"] >= 0.99
    assert agreement["int8_accuracy"] >= 0.95
    assert agreement["fp32_accuracy"] - agreement["int8_accuracy"] <= 0.005
    assert report["sizes"]["int8"] < 0.5 * report["sizes"]["fp32"]
    assert len(report["lowest_sqnr"]) == 10
    assert report["latency_ms"]["fp32"] > 0 and report["latency_ms"]["int8"] > 0
    assert report["compact_bias_bytes"] > 0
    # a trained model (from a checkpoint) is judged on top-1 agreement, and the report says why
    assert report["gate"]["metric"] == "top1" and "trained" in report["gate"]["reason"]
    assert report["gate"]["value"] == agreement["top1"] and report["passed"]
    int8 = onnx.load(str(export / "model.int8.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in int8.graph.node}
    # the squeeze-excitation pools and gates (three MBConv blocks) read int8 data
    producer = {o: n.op_type for n in int8.graph.node for o in n.output}
    int8_inputs = [
        n.op_type
        for n in int8.graph.node
        if all(producer.get(i) == "DequantizeLinear" for i in n.input)
    ]
    assert int8_inputs.count("Mul") == 3 and int8_inputs.count("GlobalAveragePool") >= 3
    # laid out for onnxruntime: int8 MatMuls and Gemms hand on float (MatMulIntegerToFloat,
    # QGemm), int8 convolutions hand on int8 (QLinearConv); attention stays one fused operator
    requantized = {
        producer.get(n.input[0]) for n in int8.graph.node if n.op_type == "QuantizeLinear"
    }
    assert "Conv" in requantized and not {"MatMul", "Gemm"} & requantized
    assert "Attention" in producer.values()
    metadata = metadata_of(int8)
    assert metadata.quantization["mode"] == "static"
    assert metadata.quantization["quantized_ops"] == list(DEFAULT_RECIPE.op_types)
    assert metadata.quantization["laid_out_for"] == "onnxruntime"
    assert metadata.quantization["recipe"] == DEFAULT_RECIPE.name == report["recipe"]
    assert metadata.quantization["activation_type"] == report["choice"]["activation_type"]
    assert metadata.quantization["target_cpu"] == report["choice"]["target_cpu"]
    assert "auto = " in result.err and "this machine" in result.err
    assert "lowest SQNR" in result.out and "top-1 agreement" in result.out
    assert not list(export.glob(".quantize-*")) and not list(export.glob(".*.lock"))
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["quantization"]["mode"] == "static"
    assert manifest["files"]["model.int8.onnx"] == (export / "model.int8.onnx").stat().st_size


def test_prepare_turns_spatial_means_into_exact_pooling(tmp_path: Path, digits) -> None:
    model = digits["export"] / "model.onnx"
    pre = tmp_path / "pre.onnx"
    # one squeeze-excitation per MBConv block (three in the fixture) and the head
    assert prepare(model, pre) == 4
    assert (tmp_path / "pre.onnx.data").is_file()  # weights beside it, not in Python
    assert len(onnx.load(str(pre), load_external_data=False).graph.value_info) > 50
    ops = [n.op_type for n in onnx.load(str(pre)).graph.node]
    assert "ReduceMean" not in ops and ops.count("GlobalAveragePool") == 4
    x = np.random.default_rng(0).standard_normal((2, 1, 64, 64), dtype=np.float32)
    before, after = (
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[
            0
        ]
        for path in (model, pre)
    )
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    nodes = onnx.load(str(pre)).graph.node
    ends = DEFAULT_RECIPE.exclusions(onnx.load(str(pre)))
    assert nodes[0].op_type == "Conv" and nodes[0].name in ends  # the stem
    head = [n for n in nodes if n.op_type in ("Gemm", "MatMul")][-1]
    assert head.output[0] == "logits" and head.name in ends


def test_prepare_can_split_attention_into_its_exact_products(tmp_path: Path, digits) -> None:
    """OpenVINO's recipe: each fused Attention as MatMul -> Add (bias) -> Softmax -> MatMul,
    with the heads split and merged around them; onnxruntime gives the same logits."""
    model = digits["export"] / "model.onnx"
    pre = tmp_path / "pre.onnx"
    prepare(model, pre, split_attention=True)
    ops = [n.op_type for n in onnx.load(str(pre), load_external_data=False).graph.node]
    assert "Attention" not in ops and ops.count("Softmax") == 3  # the fixture's three blocks
    assert len(OPENVINO_RECIPE.exclusions(onnx.load(str(pre)))) == 3 * 2 + 2  # + stem, head
    x = np.random.default_rng(0).standard_normal((3, 1, 64, 64), dtype=np.float32)
    before, after = (
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[
            0
        ]
        for path in (model, pre)
    )
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_attention_split_leaves_what_it_cannot_express() -> None:
    """A causal Attention or one without an explicit scale stays fused."""
    spec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 64]) for n in "qkvo"]
    nodes = [
        helper.make_node("Attention", ["q", "k", "v"], ["a"], q_num_heads=2, kv_num_heads=2),
        helper.make_node(
            "Attention", ["a", "k", "v"], ["b"], q_num_heads=2, kv_num_heads=2, scale=0.5,
            is_causal=1,
        ),
        helper.make_node("Attention", ["b", "k", "v"], ["o"], q_num_heads=2, kv_num_heads=2,
                         scale=0.5),
    ]  # fmt: skip
    model = helper.make_model(
        helper.make_graph(nodes, "g", spec[:3], spec[3:]),
        opset_imports=[helper.make_opsetid("", 23)],
    )
    reference = model.SerializeToString()
    assert attention_as_matmuls(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Attention") == 2 and ops.count("Softmax") == ops.count("Mul") == 1
    feeds = {
        n: np.random.default_rng(1).standard_normal((1, 4, 64), dtype=np.float32) for n in "qkv"
    }
    outputs = [
        ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for m in (reference, model.SerializeToString())
    ]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


def test_only_squeeze_excitation_gates_are_quantized_muls() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])
    nodes = [
        helper.make_node("Sigmoid", ["s"], ["g"]),
        helper.make_node("Unsqueeze", ["g", "axes"], ["g4"]),
        helper.make_node("Mul", ["x", "g4"], ["gated"], name="gate"),
        helper.make_node("Mul", ["gated", "two"], ["y"], name="scale"),
    ]
    constants = [
        helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, s], [y], constants))
    assert non_gate_muls(model) == ["scale"]
    assert "scale" in DEFAULT_RECIPE.exclusions(model)


def test_fallback_returns_tensors_to_float_until_the_gate_passes(
    tmp_path: Path, digits, run_cli
) -> None:
    export = fresh_export(digits, tmp_path)
    result = run_cli(
        "quantize",
        export,
        "--calibration-data",
        digits["calibration"],
        "--eval-data",
        digits["test"],
        "--calibration-samples",
        "1",  # one sample: the default falls short of a 100 % gate here
        "--min-agreement",
        "1.0",
        "--max-fallback-steps",
        "2",
    )
    report = json.loads((export / "quantization.json").read_text())
    assert report["fallback_steps"], "the default quantization should miss a 100 % gate here"
    assert all(step for step in report["fallback_steps"])
    assert set(report["fallback_steps"][0]) <= set(report["excluded_nodes"])
    assert result.code == (0 if report["passed"] else 1)
    # the speed after the fallback is measured against the speed before it
    latency = report["latency_ms"]
    assert latency["int8 before fallback"] > 0 and report["speedup_before_fallback"] > 0
    assert report["agreement_before_fallback"]["top1"] < 1.0
    assert "int8 before fallback" in result.out
    slower = latency["int8"] > latency["int8 before fallback"]
    assert any("fallback made the int8 model slower" in n for n in report["notes"]) == slower


def test_dynamic_quantization(tmp_path: Path, digits, run_cli) -> None:
    export = fresh_export(digits, tmp_path)
    result = run_cli("quantize", export, "--mode", "dynamic", "--eval-data", digits["test"])
    assert result.code == 0, result.err
    int8 = onnx.load(str(export / "model.int8.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    assert "ConvInteger" not in ops  # dynamic Conv quantization brings no speed: left alone


@pytest.mark.parametrize(
    ("recipe", "laid_out_for", "requantized"),
    [("requantized", "onnxruntime", {"Conv", "MatMul", "Gemm"}), ("openvino", "openvino", set())],
)
def test_recipe_option_picks_the_layout(
    tmp_path: Path, digits, run_cli, recipe: str, laid_out_for: str, requantized: set[str]
) -> None:
    """--recipe overrides the runtime's layout; the model records the one it has."""
    export = fresh_export(digits, tmp_path)
    result = run_cli(
        "quantize", export, "--calibration-data", digits["calibration"], "--eval-data",
        digits["test"], "--latency-runs", "2", "--recipe", recipe,
    )  # fmt: skip
    assert result.code == 0, result.err
    int8 = onnx.load(str(export / "model.int8.onnx"))
    producer = {o: n.op_type for n in int8.graph.node for o in n.output}
    quantized = {producer.get(n.input[0]) for n in int8.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized & {"Conv", "MatMul", "Gemm"} == requantized
    metadata = metadata_of(int8)
    assert metadata.quantization["recipe"] == RECIPES[recipe].name
    assert metadata.quantization["laid_out_for"] == laid_out_for
    refused = run_cli("quantize", export, "--mode", "dynamic", "--recipe", recipe)
    assert refused.code == 2 and "--recipe is for static quantization" in refused.err


def test_recipe_of_onnxruntimes_default_op_set(tmp_path: Path, digits, run_cli) -> None:
    """``--recipe onnxruntime-ops`` names no op types (onnxruntime picks them): the report
    records none instead of failing on them (it was an internal error)."""
    export = fresh_export(digits, tmp_path)
    result = run_cli(
        "quantize", export, "--calibration-data", digits["calibration"], "--eval-data",
        digits["test"], "--latency-runs", "2", "--recipe", "onnxruntime-ops",
    )  # fmt: skip
    assert result.code == 0, result.err
    report = json.loads((export / "quantization.json").read_text())
    assert report["recipe"] == RECIPES["onnxruntime-ops"].name
    assert report["quantized_ops"] == []
    int8 = onnx.load(str(export / "model.int8.onnx"), load_external_data=False)
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)


def test_infer_script_runs_the_int8_model(tmp_path: Path, digits) -> None:
    from test_infer import run_without_torch

    export = fresh_export(digits, tmp_path)
    from coatnet_export.cli import main

    with pytest.raises(SystemExit) as done:
        main(
            [
                "quantize",
                str(export),
                "--calibration-data",
                str(digits["calibration"]),
                "--eval-data",
                str(digits["test"]),
            ]
        )
    assert done.value.code == 0
    result = run_without_torch(export / "model.int8.onnx", digits["test"] / "3", "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records and sum(r["top_k"][0]["label"] == "3" for r in records) >= 0.9 * len(records)


def test_compacted_biases_are_lossless(tmp_path: Path, digits) -> None:
    model = onnx.load(str(digits["export"] / "model.onnx"))
    saved = compact_biases(model)
    assert saved > 0
    assert any(n.op_type == "Gather" for n in model.graph.node)
    onnx.save(model, str(tmp_path / "compact.onnx"))
    x = np.random.default_rng(0).standard_normal((3, 1, 64, 64), dtype=np.float32)
    before, after = (
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[
            0
        ]
        for path in (digits["export"] / "model.onnx", tmp_path / "compact.onnx")
    )
    np.testing.assert_array_equal(after, before)


def test_export_with_quantize(tmp_path: Path, digits, run_cli) -> None:
    result = run_cli(
        "--checkpoint",
        FIXTURE / "digits.safetensors",
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--crop-pct",
        "1.0",
        "--output",
        tmp_path / "q",
        "--samples",
        "1",
        "--quantize",
        "static",
        "--calibration-data",
        digits["calibration"],
        "--eval-data",
        digits["test"],
    )
    assert result.code == 0, result.err
    assert (tmp_path / "q" / "model.int8.onnx").is_file()
    assert (tmp_path / "q" / "quantization.json").is_file()


def test_bad_quantization_inputs(tmp_path: Path, digits, run_cli, monkeypatch) -> None:
    export = fresh_export(digits, tmp_path / "m")
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.png").write_text("not an image")
    (junk / "cut.png").write_bytes(
        (digits["calibration"] / "0").glob("*.png").__next__().read_bytes()[:20]
    )
    bare = tmp_path / "bare"
    bare.mkdir()
    model = onnx.load(str(export / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(bare / "model.onnx"))
    cases = [
        (["quantize", export], "needs --calibration-data"),
        (["quantize", export, "--calibration-data", tmp_path / "nowhere"], "not a directory"),
        (["quantize", export, "--calibration-data", empty], "no usable image"),
        (["quantize", export, "--calibration-data", junk], "no usable image in"),
        (["quantize", bare, "--random-calibration"], "pass --img-size H W, --mean and --std"),
    ]
    for args, fragment in cases:
        before = listing(tmp_path)
        result = run_cli(*args)
        assert result.code == 2, (args, result.err)
        assert fragment in result.err and "Traceback" not in result.err, result.err
        assert listing(tmp_path) == before, args

    assert run_cli("quantize", export, "--mode", "dynamic").code == 0
    shutil.copy(export / "model.int8.onnx", bare / "model.onnx")
    again = run_cli("quantize", bare / "model.onnx", "--random-calibration")
    assert again.code == 2 and "already quantized" in again.err

    mixed = tmp_path / "mixed"
    shutil.copytree(digits["calibration"], mixed)
    (mixed / "0" / "0000_bad.png").write_text("corrupt")  # sorts first
    skipped = run_cli(
        "quantize", export, "--calibration-data", mixed, "--eval-data", digits["test"]
    )
    assert skipped.code == 0, skipped.err
    assert "skipped 1 unreadable calibration file(s)" in skipped.out

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("coatnet_export.quantize.outputs.tempfile.mkdtemp", refuse)
    before = listing(tmp_path)
    unwritable = run_cli("quantize", export, "--random-calibration")
    assert unwritable.code == 2 and "is not writable" in unwritable.err
    assert listing(tmp_path) == before


def test_hints_name_each_command_s_own_dynamic_option(tmp_path: Path, digits, run_cli) -> None:
    export = fresh_export(digits, tmp_path)
    quantize = run_cli("quantize", export)
    assert quantize.code == 2 and "or --mode dynamic" in quantize.err
    assert "--quantize dynamic" not in quantize.err
    exported = run_cli(
        "--checkpoint", FIXTURE / "digits.safetensors", "--output", tmp_path / "q",
        "--quantize", "static",
    )  # fmt: skip
    assert exported.code == 2 and "or --quantize dynamic" in exported.err
    assert "--mode dynamic" not in exported.err
    assert not (tmp_path / "q").exists()  # refused before exporting anything


def external_export(digits: dict[str, Path], tmp_path: Path) -> Path:
    """The digits fixture exported with its weights in model.onnx.data."""
    labels = [line for line in (FIXTURE / "labels.txt").read_text().splitlines() if line]
    return run_export(
        ExportOptions(
            architecture=None,
            output=tmp_path / "external",
            checkpoint=FIXTURE / "digits.safetensors",
            mean=(0.5,),
            std=(0.5,),
            crop_pct=1.0,
            labels=labels,
            validate=False,
            external_data_threshold=10_000,
        ),
        Progress(enabled=False),
    ).directory


def test_hostile_models_end_in_one_error_line(tmp_path: Path, digits, run_cli) -> None:
    export = fresh_export(digits, tmp_path / "m")
    model = onnx.load(str(export / "model.onnx"))
    two = tmp_path / "two"
    two.mkdir()
    extra = onnx.load(str(export / "model.onnx"))
    extra.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1]))
    onnx.save(extra, str(two / "model.onnx"))
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    for prop in model.metadata_props:
        if prop.key == "img_size":
            prop.value = "[64, "
    onnx.save(model, str(garbled / "model.onnx"))
    missing = external_export(digits, tmp_path / "missing")
    (missing / "model.onnx.data").unlink()
    cut = external_export(digits, tmp_path / "cut")
    data = cut / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    cases = [
        (two, "has 2 inputs"),
        (garbled, "metadata is damaged"),
        (missing, "which is missing"),
        (cut, "is truncated"),
    ]
    for folder, fragment in cases:
        before = listing(tmp_path)
        result = run_cli("quantize", folder, "--calibration-data", digits["calibration"])
        assert result.code == 2, (folder, result.err)
        lines = [line for line in result.err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and fragment in lines[0], result.err
        assert "Traceback" not in result.err
        assert listing(tmp_path) == before, folder


def test_full_disk_mid_quantize_leaves_the_export_as_it_was(tmp_path: Path, digits) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    fp32 = (digits["export"] / "model.onnx").stat().st_size
    # room for the export and the prepared copy of its weights, not for the int8 models
    size_kib = (2 * fp32 + fp32 // 8 + 64 * 1024) // 1024
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        export = disk / "export"
        shutil.copytree(digits["export"], export)
        before = listing(disk)
        result = subprocess.run(
            [sys.executable, "-m", "coatnet_export", "quantize", str(export),
             "--calibration-data", str(digits["calibration"]), "--calibration-samples", "8",
             "--eval-data", str(digits["test"] / "1")],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "no space left on device" in lines[0], result.stderr
        assert "calibrat" in result.stderr  # it failed mid-quantize, after calibration
        assert listing(disk) == before
    finally:
        subprocess.run(["umount", str(disk)], check=True)
