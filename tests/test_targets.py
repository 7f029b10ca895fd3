"""coatnet-export package: the e2e target (Pillow in the graph), the ort target, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from coatnet_export.cli import main
from coatnet_export.console import Progress
from coatnet_export.describe import describe, load_proto, metadata_of
from coatnet_export.export.pipeline import ExportOptions, run_export
from coatnet_export.metadata import record_artefacts, write_props
from coatnet_export.preprocess import Preprocessing
from coatnet_export.targets.e2e import (
    measure,
    pixel_errors,
    preprocessing_model,
    read_images,
    rgb_pixels,
)

from conftest import TINY, export_digits
from test_infer import load_script

FIXTURE = Path(__file__).parent / "fixtures" / "digits"

SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def cli(*args: object) -> int:
    """Run ``coatnet-export ARGS`` in this process (for module fixtures); its exit code."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


def make_photos(folder: Path) -> list[Path]:
    """scikit-learn's two photos cut and scaled to 12 shapes, as JPEG and PNG, RGB, L, RGBA."""
    from sklearn.datasets import load_sample_images

    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    shapes = [  # source, crop box, resize to (width, height), format, mode
        (china, None, None, "jpg", "RGB"),
        (flower, None, None, "png", "RGB"),
        (china, (100, 0, 340, 427), None, "jpg", "RGB"),  # portrait
        (flower, (0, 50, 640, 250), None, "png", "RGB"),  # wide
        (china, None, (1999, 1333), "jpg", "RGB"),  # large
        (flower, None, (57, 41), "png", "RGB"),  # smaller than the model input
        (china, (0, 0, 333, 97), None, "jpg", "RGB"),  # panorama, odd sides
        (flower, (200, 100, 231, 400), None, "png", "RGB"),  # very tall and narrow
        (china, None, (73, 73), "jpg", "RGB"),  # small square
        (flower, None, (1001, 1501), "jpg", "RGB"),  # large portrait, odd sides
        (china, None, None, "png", "L"),  # greyscale
        (flower, (10, 10, 411, 287), None, "png", "RGBA"),  # with alpha
    ]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (source, box, size, fmt, mode) in enumerate(shapes):
        image = source.crop(box) if box else source
        image = (image.resize(size, Image.Resampling.BICUBIC) if size else image).convert(mode)
        if mode == "RGBA":
            ramp = np.linspace(0, 255, image.width * image.height).astype(np.uint8)
            image.putalpha(Image.fromarray(ramp.reshape(image.height, image.width)))
        path = folder / f"photo{i:02d}_{image.width}x{image.height}_{mode}.{fmt}"
        image.save(path, **({"quality": 90} if fmt == "jpg" else {}))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    make_photos(folder)
    return folder


@pytest.fixture(scope="module")
def decoded_photos(photos: Path) -> list[tuple[str, Image.Image]]:
    return read_images([photos])


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """The trained digits fixture exported, quantized and packaged as e2e models."""
    made = export_digits(tmp_path_factory.mktemp("digits"))
    root, export = made["root"], made["export"]
    quantized = cli(
        "quantize", export, "--calibration-data", root / "calibration", "--eval-data",
        root / "test",
    )  # fmt: skip
    assert quantized == 0
    assert cli("package", export, "--target", "e2e") == 0
    return {"export": export, "test": root / "test"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A seeded TINY RGB export whose weights live in model.onnx.data."""
    export = tmp_path_factory.mktemp("tiny") / "export"
    run_export(
        ExportOptions(
            architecture=TINY,
            output=export,
            img_size=(64, 64),
            num_classes=10,
            samples=1,
            external_data_threshold=0,
        ),
        Progress(enabled=False),
    )
    return export


def copy_of(export: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    return copy


def infer_json(capsys, *args: object) -> list[dict]:
    """scripts/infer.py's --json lines, run in this process."""
    infer = load_script()
    capsys.readouterr()
    assert infer.main([str(a) for a in args] + ["--json", "--top-k", "3"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


# --- the preprocessing graph against Pillow ---


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize(
    ("size", "crop_pct", "channels", "crop_mode"),
    [
        ((224, 224), 0.875, 3, "center"),
        ((64, 96), 1.0, 3, "center"),
        ((64, 64), 0.95, 1, "center"),
        ((96, 96), 1.0, 3, "squash"),  # timm's 384 model: stretch, no crop
        ((64, 80), 0.9, 3, "squash"),  # stretch to 71 x 88, then crop
    ],
)
def test_preprocessing_graph_matches_pillow_on_photos(
    decoded_photos: list[tuple[str, Image.Image]],
    interpolation: str,
    size,
    crop_pct: float,
    channels: int,
    crop_mode: str,
) -> None:
    mean, std = (0.5, 0.4, 0.3)[:channels], (0.25, 0.2, 0.3)[:channels]
    pre = Preprocessing(size, mean, std, crop_pct, interpolation, crop_mode)
    errors = pixel_errors(pre, decoded_photos)
    assert len(errors) == 12
    if crop_mode == "squash":  # every photo stretched over the whole input, whatever its shape
        assert pre.resized_size(1, 1000) == pre.resized_size(1000, 1)
    worst = max(float(e.max()) for e in errors)
    assert worst < 1e-3, worst  # Pillow's pixels: its weights and 22-bit sums, computed alike


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("crop_mode", ["center", "squash"])
def test_resize_and_crop_sizes_match_python_for_many_shapes(
    crop_mode: str, interpolation: str
) -> None:
    """Every (height, width), up and down, each axis its own way: exactly Pillow's pixels."""
    pre = Preprocessing((48, 40), (0.0,) * 3, (1.0,) * 3, 0.875, interpolation, crop_mode)
    session = ort.InferenceSession(
        preprocessing_model(pre).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    for height, width in [(1, 1), (1, 700), (700, 1), (55, 46), *rng.integers(1, 400, (60, 2))]:
        pixels = rng.integers(0, 256, (int(height), int(width), 3), dtype=np.uint8)
        expected = pre(Image.fromarray(pixels)) * 255.0
        actual = session.run(None, {"image": pixels[None]})[0][0] * 255.0
        np.testing.assert_allclose(actual, expected, atol=1e-3, err_msg=f"{height}x{width}")


# --- the e2e models ---


def test_e2e_models_agree_with_infer_on_photos(digits: dict[str, Path], photos: Path, capsys):
    export = digits["export"]
    for e2e, source in (
        ("model.e2e.onnx", "model.onnx"),
        ("model.e2e.int8.onnx", "model.int8.onnx"),
    ):
        with_graph = infer_json(capsys, export / e2e, photos)
        with_pillow = infer_json(capsys, export / source, photos)
        assert len(with_graph) == len(with_pillow) == 12
        for ours, theirs in zip(with_graph, with_pillow, strict=True):
            assert ours.keys() == theirs.keys() and ours["image"] == theirs["image"]
            assert ours["top_k"][0]["index"] == theirs["top_k"][0]["index"], ours["image"]
            difference = ours["top_k"][0]["probability"] - theirs["top_k"][0]["probability"]
            assert abs(difference) < 0.03, (e2e, ours["image"], difference)


def test_infer_refuses_preprocessing_options_for_an_e2e_model(digits, photos: Path, capsys):
    infer = load_script()
    assert (
        infer.main([str(digits["export"] / "model.e2e.onnx"), str(photos), "--size", "8", "8"]) == 2
    )
    assert "preprocesses in its graph" in capsys.readouterr().err


def test_e2e_keeps_digit_accuracy(digits: dict[str, Path]) -> None:
    """The 360 held-out digits: the e2e model predicts exactly what fp32 + Pillow predicts."""
    export = digits["export"]
    metadata = metadata_of(load_proto(export / "model.onnx"))
    images = read_images([digits["test"]])
    agreement = measure(
        export / "model.e2e.onnx", export / "model.onnx", metadata.preprocessing(), images
    )
    assert agreement.images == 360
    assert agreement.top1 == 1.0
    assert agreement.pixel_max <= 1.0 + 1e-3
    assert agreement.logit_max_rel < 1e-2
    session = ort.InferenceSession(str(export / "model.e2e.onnx"))
    correct = sum(
        int(session.run(None, {"image": rgb_pixels(image)})[0].argmax())
        == int(Path(name).parent.name)
        for name, image in images
    )
    assert correct / len(images) > 0.9  # the trained fixture's accuracy, kept


def test_e2e_signature_metadata_and_external_weights(tiny: Path, tmp_path: Path, run_cli):
    export = copy_of(tiny, tmp_path)
    result = run_cli("package", export, "--target", "e2e", "--json", tmp_path / "e2e.json")
    assert result.code == 0, result.err
    model = onnx.load(str(export / "model.e2e.onnx"), load_external_data=False)
    (image,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and dims == [1, "height", "width", 3]
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    (logits,) = model.graph.output
    assert logits.name == "logits"
    assert [d.dim_value for d in logits.type.tensor_type.shape.dim] == [1, 10]
    assert (export / "model.e2e.onnx.data").is_file()
    assert (export / "model.e2e.onnx.data").read_bytes() == (
        export / "model.onnx.data"
    ).read_bytes()
    original = metadata_of(load_proto(export / "model.onnx"))
    metadata = metadata_of(load_proto(export / "model.e2e.onnx"))
    assert metadata.weights_sha256 == original.weights_sha256
    assert metadata.extra["e2e"]["source"] == "model.onnx"
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert report["target"] == "e2e" and report["rows"][0]["top1"] == 1.0
    assert report["rows"][0]["logit_max_rel"] < 1e-2


def test_e2e_logits_of_a_seeded_export_on_photos(
    tiny: Path, tmp_path: Path, photos: Path, decoded_photos
) -> None:
    export = copy_of(tiny, tmp_path)
    assert cli("package", export, "--target", "e2e", "--check-images", photos) == 0
    pre = metadata_of(load_proto(export / "model.onnx")).preprocessing()
    agreement = measure(export / "model.e2e.onnx", export / "model.onnx", pre, decoded_photos)
    assert agreement.pixel_max <= 1.0 + 1e-3
    assert agreement.logit_max_rel < 1e-2
    assert agreement.top1 == 1.0


def test_e2e_of_an_opset_17_export(tmp_path: Path, photos: Path, run_cli) -> None:
    """A TorchScript export (opset 17) keeps its opset: the preprocessing needs 15."""
    export = tmp_path / "ts"
    run_export(
        ExportOptions(
            architecture=TINY, output=export, img_size=(32, 32), num_classes=4, samples=1,
            exporter="torchscript", interpolation="bilinear", crop_pct=0.9,
        ),
        Progress(enabled=False),
    )  # fmt: skip
    result = run_cli("package", export, "--target", "e2e", "--check-images", photos)
    assert result.code == 0, result.err
    opsets = {o.domain: o.version for o in load_proto(export / "model.e2e.onnx").opset_import}
    assert opsets[""] == 17


# --- the ort target ---


def test_ort_converts_validates_and_records(digits: dict[str, Path], tmp_path: Path, run_cli):
    export = copy_of(digits["export"], tmp_path)
    result = run_cli("package", export, "--target", "ort", "--json", tmp_path / "ort.json")
    assert result.code == 0, result.err
    expected = {"model.ort", "model.int8.ort", "model.e2e.ort", "model.e2e.int8.ort"}
    assert listing(export / "ort") == expected | {"required_operators_and_types.config"}
    config = (export / "ort" / "required_operators_and_types.config").read_text()
    assert "Loop" in config and "QuantizeLinear" in config  # e2e: the resize passes
    report = json.loads((tmp_path / "ort.json").read_text())
    assert all(row["passed"] and row["top1"] == 1.0 for row in report["rows"])
    assert {row["NNAPI"].split(":")[0].split()[0] for row in report["rows"]} <= {
        "YES",
        "MAYBE",
        "NO",
    }
    image = np.zeros((1, 50, 70, 3), np.uint8)
    session = ort.InferenceSession(str(export / "ort" / "model.e2e.ort"))
    assert session.run(None, {"image": image})[0].shape == (1, 10)
    recorded = json.loads((export / "manifest.json").read_text())["artefacts"]
    assert {f"ort/{name}" for name in expected} <= recorded.keys()
    assert recorded["ort/required_operators_and_types.config"]["kind"] == "ort config"


def test_ort_of_external_weights_and_a_subset(tiny: Path, tmp_path: Path, run_cli) -> None:
    export = copy_of(tiny, tmp_path)
    result = run_cli("package", export, "--target", "ort", "--ort-models", "fp32")
    assert result.code == 0, result.err
    assert listing(export / "ort") == {"model.ort", "required_operators_and_types.config"}
    again = run_cli("package", export, "--target", "ort", "--ort-models", "fp32")
    assert again.code == 2 and "--force" in again.err


def test_info_lists_every_artefact(digits: dict[str, Path], tmp_path: Path, run_cli) -> None:
    export = copy_of(digits["export"], tmp_path)
    assert run_cli("package", export, "--target", "ort", "--ort-models", "int8").code == 0
    (export / "notes.txt").write_text("mine")
    result = run_cli("info", export, "--json", "-")
    assert result.code == 0, result.err
    found = json.loads(result.out)["artefacts"]
    assert set(found) == {
        "model.onnx", "model.int8.onnx", "model.e2e.onnx", "model.e2e.int8.onnx",
        "manifest.json", "validation.json", "quantization.json", "ort/model.int8.ort",
        "ort/required_operators_and_types.config", "notes.txt",
    }  # fmt: skip
    assert found["model.e2e.int8.onnx"].startswith("e2e int8")
    assert found["ort/model.int8.ort"].startswith("ort int8")
    assert found["notes.txt"].startswith("other")
    assert "artefacts" in describe(export)


def test_record_artefacts_drops_files_that_are_gone(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "a.bin").write_bytes(b"123")
    record_artefacts(tmp_path, {"a.bin": ("x", "first")})
    (tmp_path / "a.bin").unlink()
    (tmp_path / "b.bin").write_bytes(b"1")
    record_artefacts(tmp_path, {"b.bin": ("y", "second")})
    recorded = json.loads((tmp_path / "manifest.json").read_text())["artefacts"]
    assert recorded == {"b.bin": {"kind": "y", "purpose": "second", "bytes": 1}}


# --- bad input: one line, exit 2, nothing written ---


def test_bad_requests_write_nothing(tiny: Path, tmp_path: Path, run_cli) -> None:
    export = copy_of(tiny, tmp_path)
    before = listing(export)
    cases = [
        (("--target", "tflite"), "unknown target"),
        (("--target", "e2e", "--output", tmp_path / "out"), "--output is for"),
        (("--target", "e2e", "--ort-style", "runtime"), "--ort-style (ort): option(s) for"),
        (("--target", "ort", "--check-images", tmp_path), "--check-images (e2e): option(s)"),
        (("--target", "ort", "--ort-models", "int8"), "holds no model.int8.onnx"),
        (("--target", "e2e", "--check-images", tmp_path / "none"), "no readable image"),
    ]
    for args, message in cases:
        result = run_cli("package", export, *args)
        assert result.code == 2, (args, result.err)
        assert message in result.err and len(result.err.strip().splitlines()) == 1, result.err
        assert listing(export) == before, args
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("package", empty, "--target", "e2e")
    assert result.code == 2 and "holds no export" in result.err
    assert listing(empty) == set()


def test_existing_e2e_needs_force(tiny: Path, tmp_path: Path, run_cli) -> None:
    export = copy_of(tiny, tmp_path)
    assert run_cli("package", export, "--target", "e2e").code == 0
    before = {p: (export / p).stat().st_mtime_ns for p in listing(export)}
    result = run_cli("package", export, "--target", "e2e")
    assert result.code == 2 and "--force" in result.err
    assert {p: (export / p).stat().st_mtime_ns for p in listing(export)} == before
    assert run_cli("package", export, "--target", "e2e", "--force").code == 0


def test_lanczos_export_is_refused(tiny: Path, tmp_path: Path, run_cli) -> None:
    """ONNX Resize has no Lanczos: an export that resizes with it cannot have an e2e model."""
    export = copy_of(tiny, tmp_path)
    model = onnx.load(str(export / "model.onnx"), load_external_data=False)
    metadata = metadata_of(model)
    metadata.interpolation = "lanczos"
    write_props(model, metadata)
    onnx.save(model, str(export / "model.onnx"))
    before = listing(export)
    result = run_cli("package", export, "--target", "e2e")
    assert result.code == 2 and "lanczos" in result.err
    assert listing(export) == before


def test_ort_refuses_a_model_over_two_gigabytes(tiny: Path, tmp_path: Path, run_cli) -> None:
    export = copy_of(tiny, tmp_path)
    with (export / "model.onnx.data").open("r+b") as weights:  # sparse: no disk is used
        weights.truncate(2**31)
    result = run_cli("package", export, "--target", "ort")
    assert result.code == 2 and "capped at 2 GiB" in result.err
    assert not (export / "ort").exists()


def test_ort_without_its_tools(tiny: Path, tmp_path: Path) -> None:
    """onnxruntime without its tools: a one-line error naming what to install."""
    export = copy_of(tiny, tmp_path)
    before = listing(export)
    code = (
        "import sys; sys.modules['onnxruntime.tools.convert_onnx_models_to_ort'] = None; "
        "from coatnet_export.cli import main; "
        f"main(['package', {str(export)!r}, '--target', 'ort'])"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 2, run.stderr
    assert "pip install onnxruntime" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert listing(export) == before
