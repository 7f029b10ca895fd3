"""timm's CoAtNet family against real timm: the committed fixtures (scripts/timm_vectors.py)
hold timm's state dicts of small configurations with random, non-trivial weights and timm's
logits for them. Our PyTorch model and our ONNX export must reproduce those logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from coatnet_export.console import Progress
from coatnet_export.errors import InputError
from coatnet_export.export import transforms
from coatnet_export.export.pipeline import ExportOptions, run_export
from coatnet_export.quantize.presets import PRESETS
from coatnet_export.sources.architecture import recognise_timm
from coatnet_export.sources.timm_weights import fit_timm_state_dict
from models import TIMM_VARIANTS, TimmSpec, architecture_from_dict, get_variant
from models.timm_config import scaled

FIXTURES = Path(__file__).parent / "fixtures" / "timm"
NAMES = sorted(p.name.removesuffix(".json") for p in FIXTURES.glob("*.json"))
QUICK = ["coatnet_bn_0_rw", "coatnet_rmlp_1_rw", "coatnet_nano_cc", "coatnext_nano_rw"]
"""Exported in every run; the other fixtures' exports are marked slow."""
GATE = 1e-5


def fixture_spec(name: str) -> tuple[TimmSpec, dict]:
    """The scaled architecture a fixture was made with, and its description."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["scale"].items()}
    return scaled(TIMM_VARIANTS[meta["architecture"]], name, **changes), meta


def reference(name: str) -> tuple[np.ndarray, np.ndarray]:
    io = np.load(FIXTURES / f"{name}.io.npz")
    return io["x"], io["y"]


def load_fixture(name: str, state_dict: dict | None = None) -> torch.nn.Module:
    spec, meta = fixture_spec(name)
    model = spec.build(tuple(meta["img_size"]), meta["num_classes"])
    tensors = state_dict or load_file(FIXTURES / f"{name}.safetensors")
    fitted, _ = fit_timm_state_dict(tensors, model)
    model.load_state_dict(fitted, strict=False)
    return model.eval()


def assert_matches(y: np.ndarray, expected: np.ndarray) -> None:
    rel = np.abs(y - expected).max() / np.abs(expected).max()
    assert rel <= GATE, rel
    assert (y.argmax(1) == expected.argmax(1)).all()


def test_fixtures_cover_every_feature() -> None:
    specs = [fixture_spec(name)[0] for name in NAMES]
    conv = [s.conv for s in specs]
    blocks = [s.transformer for s in specs]
    assert {c.stride_in_pool for c in conv} == {True, False}
    assert {c.se_early for c in conv} == {True, False}
    assert {c.se_act for c in conv} == {"relu", "silu"}
    assert {c.pool for c in conv} == {"avg2", "max"}
    assert {c.pre_norm_act for c in conv} == {True, False} and any(c.convnext for c in conv)
    assert any(b.batch_norm for b in blocks) and any(b.rel_pos_mlp for b in blocks)
    assert any(b.layer_scale for b in blocks) and any(s.head_hidden for s in specs)
    assert any(len(set(s.stage_blocks(2))) == 2 for s in specs)  # conv then transformer
    sizes = [fixture_spec(name)[1]["img_size"] for name in NAMES]
    assert any(height != width for height, width in sizes)
    assert all((FIXTURES / f"{name}.safetensors").stat().st_size < 1 << 20 for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_pytorch_model_matches_timm(name: str) -> None:
    """Our model with timm's state dict (tables resized as timm does where the fixture was
    trained at another size) gives timm's logits."""
    x, expected = reference(name)
    with torch.no_grad():
        y = load_fixture(name)(torch.from_numpy(x)).numpy()
    assert_matches(y, expected)


def test_qkv_and_mlp_weights_load_in_either_layout() -> None:
    """timm accepts 1x1 weights as 2-D or 4-D: so do we."""
    name = "coatnet_rmlp_2_rw"
    tensors = load_file(FIXTURES / f"{name}.safetensors")
    flat = {
        k: v.flatten(1) if v.ndim == 4 and v.shape[2:] == (1, 1) else v for k, v in tensors.items()
    }
    assert any(k.endswith("attn.qkv.weight") and v.ndim == 2 for k, v in flat.items())
    x, expected = reference(name)
    with torch.no_grad():
        y = load_fixture(name, flat)(torch.from_numpy(x)).numpy()
    assert_matches(y, expected)


def test_index_and_coordinates_are_regenerated_with_ij() -> None:
    """On a non-square map a transposed index would not even have the right pairs: the
    bias of (query (0, 0), key (0, 1)) reads the table row of offset (0, -1)."""
    model = load_fixture("coatnet_0_rw")  # stage 3 is 4 x 6
    attention = model.attention_blocks()[0]
    table = attention.rel_pos.table()
    rows, cols = 4, 6
    centre = (rows - 1) * (2 * cols - 1) + (cols - 1)
    assert torch.equal(attention.relative_bias()[:, 0, 1], table[centre - 1])
    assert torch.equal(attention.relative_bias()[:, 0, cols], table[centre - (2 * cols - 1)])


def export_fixture(name: str, out: Path, **options) -> object:
    spec, meta = fixture_spec(name)
    return run_export(
        ExportOptions(
            architecture=spec,
            output=out,
            img_size=tuple(meta["img_size"]),
            checkpoint=FIXTURES / f"{name}.safetensors",
            reference_outputs=FIXTURES / f"{name}.io.npz",
            samples=1,
            **options,
        ),
        Progress(enabled=False),
    )


def check_graph(path: Path, attention_blocks: int) -> onnx.ModelProto:
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Attention") == attention_blocks
    names = [i.name for i in model.graph.initializer] + [n.name for n in model.graph.node]
    assert not [n for n in names if "rel_pos" in n or "gamma" in n]  # MLP and scales baked
    gelus = [n for n in model.graph.node if n.op_type == "Gelu"]
    assert gelus and all(a.s != b"tanh" for n in gelus for a in n.attribute)  # exact GELU
    return model


@pytest.mark.parametrize(
    "name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]
)
def test_export_matches_timm_in_onnxruntime(name: str, tmp_path: Path) -> None:
    """The exported ONNX model reproduces timm's logits in onnxruntime (the recorded case of
    the export's own validation), with every BatchNorm folded, the relative positions baked
    and one fused Attention node per block."""
    outcome = export_fixture(name, tmp_path / "export")
    recorded = [r for r in outcome.results if r.case.startswith("recorded")]
    assert outcome.passed and len(recorded) == 1
    assert recorded[0].max_rel <= GATE and recorded[0].top1 == 1.0
    blocks = sum(kind == "T" for s in range(4) for kind in fixture_spec(name)[0].stage_blocks(s))
    check_graph(outcome.directory / "model.onnx", blocks)
    assert outcome.metadata.architecture["family"] == "timm"
    assert architecture_from_dict(outcome.metadata.architecture) == fixture_spec(name)[0]


def test_rewrites_reuse_the_weights_memory(tmp_path: Path) -> None:
    """Folding, the query scale, the (in, out) token weights and the q/k/v split write into
    the memory of the weights they replace (a memory-mapped checkpoint is never held twice),
    and the model still matches timm."""
    name = "coatnext_nano_rw"  # layer scales, BatchNorms, per-head qkv: every rewrite
    model = load_fixture(name)
    weights = {n: p.data_ptr() for n, p in model.named_parameters() if p.ndim >= 2}
    weights = {n: ptr for n, ptr in weights.items() if "rel_pos" not in n}  # baked and dropped
    transforms.bake_relative_biases(model)
    transforms.fold_batchnorms(model)
    transforms.fold_attention_scales(model)
    transforms.transpose_token_linears(model)
    transforms.use_onnx_attention(model)
    used = {p.data_ptr() for p in model.parameters()}
    assert set(weights.values()) <= used, sorted(n for n, ptr in weights.items() if ptr not in used)
    x, y = reference(name)
    with torch.no_grad():
        assert_matches(model(torch.from_numpy(x)).numpy(), y)


@pytest.mark.parametrize("kind", ["model.safetensors", "pytorch_model.bin"])
def test_export_never_writes_the_memory_mapped_checkpoint(kind: str, tmp_path: Path) -> None:
    """Both checkpoint kinds are memory-mapped and rewritten in place (copy on write): the file
    keeps its bytes, and the export matches timm."""
    name = "coatnet_bn_0_rw"
    path = tmp_path / kind
    tensors = load_file(FIXTURES / f"{name}.safetensors")
    save_file(tensors, str(path)) if kind.endswith(".safetensors") else torch.save(tensors, path)
    before = path.read_bytes()
    spec, meta = fixture_spec(name)
    outcome = run_export(
        ExportOptions(
            architecture=spec,
            output=tmp_path / "export",
            img_size=tuple(meta["img_size"]),
            checkpoint=path,
            reference_outputs=FIXTURES / f"{name}.io.npz",
            samples=1,
        ),
        Progress(enabled=False),
    )
    recorded = [r for r in outcome.results if r.case.startswith("recorded")]
    assert outcome.passed and recorded[0].max_rel <= GATE
    assert path.read_bytes() == before


def test_large_biases_are_stored_as_tables_with_a_shared_index(tmp_path: Path, monkeypatch) -> None:
    """Past COMPACT_SHARE the graph keeps each block's table and gathers it with one index
    shared by a stage's blocks (coatnet_rmlp_2_rw_384's case); still exact. At 160 x 160
    stage 3's index (10,000 entries) is past what the exporter's optimiser folds back. The
    PyTorch half runs in this process, where the patched threshold applies."""
    monkeypatch.setattr(transforms, "COMPACT_SHARE", 0.0)
    spec, _ = fixture_spec("coatnet_rmlp_1_rw")
    outcome = run_export(
        ExportOptions(
            architecture=spec,
            output=tmp_path / "export",
            img_size=(160, 160),
            checkpoint=FIXTURES / "coatnet_rmlp_1_rw.safetensors",
            samples=2,
            in_process=True,
        ),
        Progress(enabled=False),
    )
    assert outcome.passed
    model = onnx.load(str(outcome.directory / "model.onnx"))
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 2  # stage 3's blocks; stage 4's small grid is folded to constants
    assert len({n.input[1] for n in gathers}) == 1
    # each lookup gathers straight into (1, heads, N, N) with the (N, N) index: a Reshape
    # after it would make onnxruntime keep two folded copies of every bias
    index = next(t for t in model.graph.initializer if t.name == gathers[0].input[1])
    assert list(index.dims) == [100, 100]  # stage 3 at 160 x 160: 10 x 10 tokens
    readers = {n.op_type for n in model.graph.node for g in gathers if g.output[0] in n.input}
    assert readers == {"Attention"}


def test_recognises_architectures_from_keys() -> None:
    for name in ("coatnet_0_rw_224", "coatnet_bn_0_rw_224", "coatnet_rmlp_1_rw2_224",
                 "coatnet_nano_cc_224", "coatnext_nano_rw_224", "coatnet_0_224"):  # fmt: skip
        state = get_variant(name).build(num_classes=7, device="meta").state_dict()
        assert recognise_timm(state).name == name
    with pytest.raises(InputError, match="none of timm's CoAtNet-family"):
        recognise_timm(load_file(FIXTURES / "coatnet_0_rw.safetensors"))


def test_bare_file_of_another_architecture_is_refused(tmp_path: Path, run_cli) -> None:
    result = run_cli(
        "--checkpoint", FIXTURES / "coatnet_0_rw.safetensors", "--variant", "coatnet_0_rw_224",
        "--output", tmp_path / "out",
    )  # fmt: skip
    assert result.code == 2 and "does not fit the model" in result.err
    assert "Traceback" not in result.err and not (tmp_path / "out").exists()
    result = run_cli(
        "--checkpoint", FIXTURES / "coatnet_0_rw.safetensors", "--variant", "coatnet_0",
        "--output", tmp_path / "out",
    )  # fmt: skip
    assert result.code == 2 and "holds a timm CoAtNet" in result.err


def test_hub_folder_names_the_architecture(tmp_path: Path, run_cli) -> None:
    """A hub folder's config.json names the architecture; a bare timm file needs it named or
    recognised (here the fixture is scaled, so config.json's name meets the key check)."""
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file(load_file(FIXTURES / "coatnet_0_rw.safetensors"), str(folder / "model.safetensors"))
    config = {"architecture": "coatnet_0_rw_224", "num_classes": 10, "pretrained_cfg": {}}
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("--checkpoint", folder, "--output", tmp_path / "out")
    assert result.code == 2 and "does not fit the model" in result.err
    config["architecture"] = "maxvit_tiny_tf_224"
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("--checkpoint", folder, "--output", tmp_path / "out")
    assert result.code == 2 and "not one of timm's CoAtNet family" in result.err


@pytest.fixture(scope="module")
def timm_export(tmp_path_factory) -> Path:
    """The coatnet_rmlp_2_rw fixture exported with timm's 0.5 mean and std (made once)."""
    export = tmp_path_factory.mktemp("timm") / "export"
    assert export_fixture("coatnet_rmlp_2_rw", export, mean=(0.5,) * 3, std=(0.5,) * 3).passed
    return export


def copy_of(export: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    return copy


QUANTIZE = ("--random-calibration", "--calibration-samples", "4", "--gate", "cosine")


@pytest.mark.parametrize(
    "choice",
    [("--target-cpu", name) for name in PRESETS] + [("--runtime", "openvino")],
    ids=[*PRESETS, "openvino"],
)
def test_timm_int8_for_every_cpu_class_and_runtime(
    choice: tuple[str, str], timm_export: Path, tmp_path: Path, run_cli
) -> None:
    """A timm export quantizes for every CPU class and in both runtimes' recipes, and passes
    its gate."""
    export = copy_of(timm_export, tmp_path)
    result = run_cli("quantize", export, *QUANTIZE, *choice)
    assert result.code == 0, result.err
    report = json.loads((export / "quantization.json").read_text())
    assert report["passed"] is True
    if choice[0] == "--target-cpu":
        assert report["choice"]["target_cpu"] == choice[1]
    int8 = onnx.load(str(export / "model.int8.onnx"), load_external_data=False)
    used = {name for node in int8.graph.node for name in node.input}
    assert [t.name for t in int8.graph.initializer if t.name not in used] == []


def test_timm_export_packages_predicts_and_benches(
    timm_export: Path, tmp_path: Path, run_cli
) -> None:
    """A timm export packages as e2e, for onnxruntime's ORT format, the browser and Triton,
    predicts a folder of images and benchmarks."""
    export = copy_of(timm_export, tmp_path)
    for target in ("e2e", "ort"):  # e2e first: the web page runs the e2e model
        assert run_cli("package", export, "--target", target).code == 0, target
    for target in ("web", "triton"):
        result = run_cli("package", export, "--target", target, "--output", tmp_path / target)
        assert result.code == 0, (target, result.err)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (70 + 10 * i, 90, 3), np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    out = tmp_path / "predictions.parquet"
    result = run_cli("predict", export, images, "--output", out, "--workers", "1")
    assert result.code == 0, result.err
    assert out.is_file()
    summary = tmp_path / "bench.json"
    result = run_cli(
        "bench", export, "--no-torch", "--runs", "5", "--warmup", "0", "--batch", "1",
        "--json", summary,
    )  # fmt: skip
    assert result.code == 0, result.err
    assert json.loads(summary.read_text())


def test_downstream_quantize_package_and_infer(tmp_path: Path, run_cli, timm_export: Path) -> None:
    """A timm export goes through quantize, package --target e2e, info, validate and
    scripts/infer.py."""
    export = copy_of(timm_export, tmp_path)
    result = run_cli(
        "quantize", export, "--random-calibration", "--calibration-samples", "4",
        "--gate", "cosine",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert (export / "model.int8.onnx").is_file()
    result = run_cli("package", export, "--target", "e2e")
    assert result.code == 0, result.err
    assert run_cli("info", export).code == 0
    checkpoint = FIXTURES / "coatnet_rmlp_2_rw.safetensors"
    result = run_cli("validate", export, "--checkpoint", checkpoint)  # the recorded timm spec
    assert result.code == 0, result.err
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), np.uint8)).save(image)
    script = Path(__file__).resolve().parents[1] / "scripts" / "infer.py"
    run = subprocess.run(
        [sys.executable, str(script), str(export / "model.onnx"), str(image), "--json"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)
