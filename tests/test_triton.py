"""package --target triton: the repository against Triton's own schema and the ONNX graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from coatnet_export.cli import main

from conftest import TINY_LABELS
from conftest import export_tiny as export

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
LABELS = TINY_LABELS
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A dynamic-batch export with labels, and its dynamic int8 model."""
    folder = export(tmp_path_factory.mktemp("triton") / "tiny")
    with pytest.raises(SystemExit) as done:
        main(["quantize", str(folder), "--mode", "dynamic", "--random-calibration"])
    assert done.value.code == 0
    return folder


def read_config(folder: Path):
    """config.pbtxt parsed with Triton's schema (unknown fields or bad values raise)."""
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def assert_matches_graph(config, model_path: Path) -> None:
    """Inputs and outputs of the config equal the ONNX graph's (names, types, dims)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    skip = 1 if config.max_batch_size else 0
    for entries, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [e.name for e in entries] == [v.name for v in values]
        for entry, value in zip(entries, values, strict=True):
            tensor_type = value.type.tensor_type
            expected_type = ONNX_TO_TRITON[tensor_type.elem_type]
            assert model_config_pb2.DataType.Name(entry.data_type) == expected_type
            shape = [d.dim_value for d in tensor_type.shape.dim]
            assert list(entry.dims) == shape[skip:]


def test_repository_matches_schema_and_graph(tiny: Path, tmp_path: Path, run_cli) -> None:
    repo = tmp_path / "repo"
    result = run_cli(
        "package", tiny, "--target", "triton", "--output", repo, "--instances", "2",
        "--threads", "1", "--max-batch-size", "4", "--openvino",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "tritonserver --model-repository=/models" in result.out
    folder = repo / "tiny"
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == [
        "tiny", "tiny/1", "tiny/1/model.onnx", "tiny/config.pbtxt", "tiny/labels.txt",
    ]  # fmt: skip
    config = read_config(folder)
    assert (config.name, config.platform, config.max_batch_size) == ("tiny", "onnxruntime_onnx", 4)
    assert_matches_graph(config, folder / "1" / "model.onnx")
    assert config.input[0].format == model_config_pb2.ModelInput.FORMAT_NCHW
    assert config.output[0].label_filename == "labels.txt"
    assert config.HasField("dynamic_batching")
    group = config.instance_group[0]
    assert (group.count, group.kind) == (2, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    assert config.parameters["intra_op_thread_count"].string_value == "1"
    accelerators = config.optimization.execution_accelerators.cpu_execution_accelerator
    assert [a.name for a in accelerators] == ["openvino"]
    assert (folder / "labels.txt").read_text().splitlines() == LABELS
    assert (folder / "1" / "model.onnx").read_bytes() == (tiny / "model.onnx").read_bytes()
    # the model takes the largest batch the config lets Triton form
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"))
    batch = np.zeros((config.max_batch_size, *config.input[0].dims), np.float32)
    assert session.run(None, {config.input[0].name: batch})[0].shape == (4, 10)


def test_int8_and_defaults(tiny: Path, tmp_path: Path, run_cli) -> None:
    repo = tmp_path / "repo"
    result = run_cli("package", tiny, "--target", "triton", "--output", repo, "--int8")
    assert result.code == 0, result.err
    folder = repo / "tiny_int8"
    config = read_config(folder)
    assert config.name == "tiny_int8" and config.max_batch_size == 8
    assert_matches_graph(config, folder / "1" / "model.onnx")
    assert (folder / "1" / "model.onnx").read_bytes() == (tiny / "model.int8.onnx").read_bytes()
    assert not config.parameters and not config.optimization.HasField("execution_accelerators")
    assert config.instance_group[0].count == 1


def test_fixed_batch_model_is_not_batched(tmp_path: Path, run_cli) -> None:
    fixed = export(tmp_path / "fixed", batch=3, labels=None)
    repo = tmp_path / "repo"
    result = run_cli("package", fixed, "--target", "triton", "--output", repo, "--name", "c0")
    assert result.code == 0, result.err
    config = read_config(repo / "c0")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [3, 3, 64, 64]
    assert_matches_graph(config, repo / "c0" / "1" / "model.onnx")
    assert (repo / "c0" / "labels.txt").read_text().splitlines() == [str(i) for i in range(10)]
    refused = run_cli(
        "package", fixed, "--target", "triton", "--output", tmp_path / "r2", "--max-batch-size", "4"
    )
    assert refused.code == 2 and "batch is fixed at 3" in refused.err
    assert not (tmp_path / "r2").exists()


def test_external_data_travels_with_the_model(tiny: Path, tmp_path: Path, run_cli) -> None:
    big = tmp_path / "big"
    shutil.copytree(tiny, big)
    model = onnx.load(str(big / "model.onnx"))
    onnx.save(model, str(big / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data")  # fmt: skip
    repo = tmp_path / "repo"
    assert run_cli("package", big, "--target", "triton", "--output", repo).code == 0
    version = repo / "tiny" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.onnx.data"]
    session = ort.InferenceSession(str(version / "model.onnx"))
    expected = ort.InferenceSession(str(tiny / "model.onnx"))
    batch = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(
        session.run(None, {"input": batch})[0], expected.run(None, {"input": batch})[0]
    )


def test_bad_requests(tiny: Path, tmp_path: Path, run_cli) -> None:
    no_output = run_cli("package", tiny, "--target", "triton")
    assert no_output.code == 2 and "--output" in no_output.err
    bad_name = run_cli("package", tiny, "--target", "triton", "--output", tmp_path / "r",
                       "--name", "a/b")  # fmt: skip
    assert bad_name.code == 2 and "--name" in bad_name.err
    fp32_only = tmp_path / "fp32"
    shutil.copytree(tiny, fp32_only, ignore=shutil.ignore_patterns("model.int8*"))
    no_int8 = run_cli("package", fp32_only, "--target", "triton", "--output", tmp_path / "r",
                      "--int8")  # fmt: skip
    assert no_int8.code == 2 and "quantize" in no_int8.err
    foreign = run_cli("package", tiny, "--target", "e2e", "--instances", "2")
    assert foreign.code == 2 and "--instances" in foreign.err
    (tmp_path / "taken").mkdir()
    taken = run_cli("package", tiny, "--target", "triton", "--output", tmp_path / "taken")
    assert taken.code == 2 and "--force" in taken.err
    assert not (tmp_path / "r").exists()
