"""Export: parity with onnxruntime for both exporters, baked biases, metadata, external data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data
from safetensors.torch import save_file

from coatnet_export.console import Progress
from coatnet_export.describe import metadata_of
from coatnet_export.export.external_data import write_self_contained
from coatnet_export.export.gathers import gather_in_final_shape
from coatnet_export.export.pipeline import ExportOptions, rejected_path, run_export
from coatnet_export.export.transforms import (
    SplitProjection,
    bake_relative_biases,
    fold_attention_scales,
    fold_batchnorms,
    transpose_token_linears,
    use_onnx_attention,
)
from coatnet_export.validate import Gates
from models import CoAtNet, Numerics, get_variant, init_weights

from conftest import TINY, assert_clean_failure, listing


def export_tiny(tmp_path: Path, **overrides) -> object:
    options = dict(architecture=TINY, output=tmp_path / "out", img_size=(64, 96), num_classes=10)
    options.update(overrides)
    return run_export(ExportOptions(**options), Progress(enabled=False))


def ops_of(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.parametrize(
    ("exporter", "attention", "expected"),
    [("dynamo", None, "fused"), ("dynamo", "matmul", "matmul"), ("torchscript", None, "matmul")],
)
def test_tiny_parity_non_square(
    tmp_path: Path, exporter: str, attention: str | None, expected: str
) -> None:
    outcome = export_tiny(tmp_path, exporter=exporter, attention=attention, seed=3)
    assert outcome.passed
    assert outcome.metadata.attention == expected
    assert outcome.metadata.opset == (23 if exporter == "dynamo" else 17)
    assert outcome.directory == tmp_path / "out"
    cases = {r.case: r for r in outcome.results}
    assert set(cases) == {"random #1", "random #2", "random #3", "random batch of 4"}
    for result in outcome.results:
        assert result.max_rel <= 1e-4 and result.top1 == 1.0 and result.nonfinite == 0
        assert result.max_abs > 0  # two different runtimes really ran
    assert outcome.graph.output_shape == ["batch", 10]
    assert outcome.graph.table_lookups == 0
    ops = ops_of(outcome.directory / "model.onnx")
    assert not ops & {"Gather", "GatherND", "GatherElements", "Dropout", "BatchNormalization"}
    if expected == "fused":  # one Attention per block, fed by three projections
        counts = outcome.graph.op_counts
        # q, k, v, out and two feed-forward MatMuls a block, and two shortcut projections
        assert counts["Attention"] == 3 and counts["MatMul"] == 3 * 6 + 2
        assert not ops & {"Softmax", "Slice", "Squeeze", "Split"}
    else:
        assert "Softmax" in ops and "Attention" not in ops
    if exporter == "dynamo":  # (TorchScript spells GELU with Muls)
        # the attention scale lives in the query weights: the only Muls are the SE gates
        nodes = onnx.load(str(outcome.directory / "model.onnx")).graph.node
        assert sum(n.op_type == "Mul" for n in nodes) == sum(TINY.num_blocks[1:3])


def test_baked_bias_bytes_and_constants(tmp_path: Path) -> None:
    outcome = export_tiny(tmp_path, img_size=(64, 64))
    # S3 at 4x4 (16 tokens) in two blocks, S4 at 2x2 (4 tokens) in one; 2 heads; float32
    assert outcome.baked_bias_bytes == (2 * 2 * 16 * 16 + 2 * 4 * 4) * 4
    model = onnx.load(str(outcome.directory / "model.onnx"))
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    assert list(shapes.values()).count([1, 2, 16, 16]) == 2
    masks = [n.input[3] for n in model.graph.node if n.op_type == "Attention"]
    assert len(masks) == 3 and all(name in shapes for name in masks)  # constants, no Unsqueeze


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--exporter", "torchscript"], "the TorchScript exporter cannot emit ONNX Attention"),
        (["--opset", "20"], "ONNX Attention exists from opset 23, not 20"),
    ],
)
def test_fused_attention_refused_where_it_cannot_be_exported(
    tmp_path: Path, run_cli, args: list[str], pattern: str
) -> None:
    before = listing(tmp_path)
    result = run_cli(
        "--variant", "coatnet_0", "--output", tmp_path / "out", "--attention", "fused", *args
    )
    assert_clean_failure(result, tmp_path, before, pattern)
    assert "--attention matmul" in result.err


@pytest.mark.parametrize("numerics", [Numerics(), Numerics.lucid()])
def test_export_transforms_keep_the_outputs(numerics: Numerics) -> None:
    """Every rewrite before export, in the pipeline's order, computes what the model did."""
    model = init_weights(TINY.build((64, 96), num_classes=10, numerics=numerics), 2).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
        bake_relative_biases(model)
        fold_batchnorms(model)
        fold_attention_scales(model)
        assert transpose_token_linears(model) == 4 * 3  # qkv, out, two feed-forward layers
        assert use_onnx_attention(model) == 3
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    qkv = model.s3[0].attn["1"].fn.to_qkv
    assert isinstance(qkv, SplitProjection)
    assert [tuple(w.shape) for w in qkv.parts] == [(16, 2 * 32)] * 3


def test_parity_gate_failure_rejects_model(tmp_path: Path) -> None:
    outcome = export_tiny(tmp_path, gates=Gates(max_rel_error=1e-12))
    assert not outcome.passed
    assert not (tmp_path / "out").exists()
    assert outcome.directory == rejected_path(tmp_path / "out")
    assert (outcome.directory / "model.onnx").is_file()
    report = json.loads((outcome.directory / "validation.json").read_text())
    assert report["passed"] is False


def test_fixed_batch(tmp_path: Path) -> None:
    outcome = export_tiny(tmp_path, batch=3)
    assert outcome.passed
    assert outcome.graph.output_shape == [3, 10]
    assert all(r.batch == 3 for r in outcome.results)


def test_metadata_round_trip(tmp_path: Path) -> None:
    labels = [f"class {i}" for i in range(10)]
    outcome = export_tiny(tmp_path, labels=labels)
    path = outcome.directory / "model.onnx"
    metadata = metadata_of(onnx.load(str(path), load_external_data=False))
    assert metadata == outcome.metadata
    assert metadata.labels == labels
    assert metadata.img_size == [64, 96] and metadata.in_channels == 3
    assert metadata.mean == [0.485, 0.456, 0.406] and metadata.interpolation == "bicubic"
    assert metadata.architecture["num_blocks"] == [1, 1, 2, 2, 1]
    assert set(metadata.versions) == {"coatnet_export", "torch", "onnx", "onnxruntime"}
    assert len(metadata.weights_sha256) == 64
    props = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
    assert json.loads(props["labels"]) == labels and props["variant"] == "tiny"
    manifest = json.loads((outcome.directory / "manifest.json").read_text())
    assert manifest["metadata"]["weights_sha256"] == metadata.weights_sha256
    assert manifest["files"] == {"model.onnx": path.stat().st_size}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_external_data_when_over_threshold(tmp_path: Path, exporter: str) -> None:
    outcome = export_tiny(tmp_path, exporter=exporter, external_data_threshold=10_000)
    assert outcome.passed
    assert outcome.graph.external_data
    assert sorted(p.name for p in outcome.directory.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.onnx.data",
        "validation.json",
    ]
    moved = tmp_path / "elsewhere"
    shutil.move(outcome.directory, moved)  # the pair moves together: the reference is relative
    session = ort.InferenceSession(str(moved / "model.onnx"))
    logits = session.run(None, {"input": np.zeros((2, 3, 64, 96), np.float32)})[0]
    assert logits.shape == (2, 10)


def test_small_model_is_one_file_even_from_dynamo(tmp_path: Path) -> None:
    outcome = export_tiny(tmp_path)
    assert not outcome.graph.external_data
    assert not (outcome.directory / "model.onnx.data").exists()
    assert sorted(p.name for p in outcome.directory.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "validation.json",
    ]


def test_streamed_single_file_equals_onnx_own_loading(tmp_path: Path) -> None:
    """The weights streamed from the data file make the model onnx itself loads from the pair."""
    outcome = export_tiny(tmp_path, external_data_threshold=10_000)
    pair = outcome.directory / "model.onnx"
    graph_only = onnx.load(str(pair), load_external_data=False)
    single = tmp_path / "single.onnx"
    write_self_contained(graph_only, pair.parent, single)
    streamed, loaded = onnx.load(str(single)), onnx.load(str(pair))
    assert [t.name for t in streamed.graph.initializer] == [
        t.name for t in loaded.graph.initializer
    ]
    for a, b in zip(streamed.graph.initializer, loaded.graph.initializer, strict=True):
        assert not uses_external_data(a) and a.dims == b.dims and a.data_type == b.data_type
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    for model in (streamed, loaded):
        model.graph.ClearField("initializer")
    assert streamed == loaded  # nodes, inputs, outputs, metadata: all as they were
    onnx.checker.check_model(str(single), full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 96), dtype=np.float32)
    outputs = [ort.InferenceSession(str(p)).run(None, {"input": x})[0] for p in (single, pair)]
    np.testing.assert_array_equal(*outputs)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_coatnet_0_parity(tmp_path: Path, exporter: str) -> None:
    outcome = run_export(
        ExportOptions(
            architecture=get_variant("coatnet_0"),
            output=tmp_path / "c0",
            exporter=exporter,
            samples=1,
            large_batch=2,
        ),
        Progress(enabled=False),
    )
    assert outcome.passed, [r.as_dict() for r in outcome.results]
    assert outcome.graph.table_lookups == 0
    assert "Gather" not in ops_of(outcome.directory / "model.onnx")
    assert outcome.graph.output_shape == ["batch", 1000]
    if exporter == "dynamo":  # fused attention: no layout ops per head, only per stage
        counts = outcome.graph.op_counts
        assert counts["Attention"] == 7 and "Softmax" not in counts
        assert counts.get("Transpose", 0) <= 6 and counts.get("Reshape", 0) <= 6


def test_checkpoint_export_and_weights_hash(tmp_path: Path, run_cli) -> None:
    model = init_weights(TINY.build((64, 64), num_classes=10), 5)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    a = export_tiny(
        tmp_path,
        output=tmp_path / "a",
        img_size=(64, 64),
        checkpoint=tmp_path / "tiny.pt",
        num_classes=None,
    )
    save_file(model.state_dict(), tmp_path / "tiny.safetensors")
    b = export_tiny(
        tmp_path,
        output=tmp_path / "b",
        img_size=(64, 64),
        checkpoint=tmp_path / "tiny.safetensors",
        num_classes=None,
    )
    assert a.passed and b.passed
    assert a.metadata.num_classes == 10  # taken from the checkpoint
    assert a.metadata.weights_sha256 == b.metadata.weights_sha256
    assert a.metadata.seed is None and a.metadata.weights.endswith("tiny.pt")


def test_checkpoint_at_another_resolution_resizes_tables(tmp_path: Path) -> None:
    model = TINY.build((64, 64), num_classes=10)
    init_weights(model, 1)
    torch.save(model.state_dict(), tmp_path / "tiny64.pt")
    outcome = export_tiny(tmp_path, img_size=(96, 128), checkpoint=tmp_path / "tiny64.pt")
    assert outcome.passed
    manifest = json.loads((outcome.directory / "manifest.json").read_text())
    assert any("trained at 64x64" in w and "96x128" in w for w in manifest["warnings"])


def test_seeded_and_checkpoint_tables_are_not_trivial() -> None:
    model = TINY.build((64, 64))
    init_weights(model, 0)
    assert isinstance(model, CoAtNet)
    assert all(a.relative_bias_table.abs().mean() > 0.1 for a in model.attention_blocks())


def _lookup_model(extra_reader: bool) -> onnx.ModelProto:
    """x + Reshape(Gather(table, Reshape(index, [-1]), axis=2), (1, 2, 3, 3)), as the exporters
    write a shared-index bias; ``extra_reader`` also reads the flat index elsewhere."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((1, 2, 5)).astype(np.float32)
    index = rng.integers(0, 5, 9).astype(np.int64)
    h = onnx.helper
    nodes = [
        h.make_node("Reshape", ["index", "flat"], ["index_flat"]),
        h.make_node("Gather", ["table", "index_flat"], ["gathered"], axis=2),
        h.make_node("Reshape", ["gathered", "bias_shape"], ["bias"]),
        h.make_node("Add", ["x", "bias"], ["y"]),
    ]
    outputs = [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 3, 3])]
    if extra_reader:
        nodes.append(h.make_node("Cast", ["index_flat"], ["index_float"], to=1))
        outputs.append(h.make_tensor_value_info("index_float", onnx.TensorProto.FLOAT, [9]))
    graph = h.make_graph(
        nodes,
        "lookup",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 3, 3])],
        outputs,
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(index, "index"),
            numpy_helper.from_array(np.array([-1], np.int64), "flat"),
            numpy_helper.from_array(np.array([1, 2, 3, 3], np.int64), "bias_shape"),
        ],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])


@pytest.mark.parametrize("extra_reader", [False, True])
def test_lookups_gather_in_their_final_shape(extra_reader: bool) -> None:
    """The Reshapes around a constant lookup go (the index takes the (3, 3) shape) unless the
    flat index is read elsewhere; onnxruntime's result is the same either way."""
    model = _lookup_model(extra_reader)
    x = np.random.default_rng(1).standard_normal((1, 2, 3, 3)).astype(np.float32)

    def run(m: onnx.ModelProto) -> list[np.ndarray]:
        onnx.checker.check_model(m, full_check=True)
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})

    before = run(model)
    rewritten = gather_in_final_shape(model)
    after = run(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    ops = [n.op_type for n in model.graph.node]
    index = next(t for t in model.graph.initializer if t.name == "index")
    if extra_reader:
        assert rewritten == 0 and ops.count("Reshape") == 2 and list(index.dims) == [9]
    else:
        assert rewritten == 1 and "Reshape" not in ops and list(index.dims) == [3, 3]
        assert {t.name for t in model.graph.initializer} == {"table", "index"}
