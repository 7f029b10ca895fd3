"""scripts/infer.py: torch-free inference on real and generated images, fp32 exports."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from coatnet_export.console import Progress
from coatnet_export.export.pipeline import ExportOptions, run_export
from coatnet_export.preprocess import Preprocessing

from conftest import TINY, export_tiny

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "infer.py"
LABELS = [f"class-{i}" for i in range(10)]


def sample_photos() -> list[Path]:
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "images"
    photos = sorted(folder.glob("*.jpg"))
    assert len(photos) >= 2, "scikit-learn's sample photographs are missing"
    return photos


def load_script():
    spec = importlib.util.spec_from_file_location("infer_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["infer_script"] = module
    spec.loader.exec_module(module)
    return module


def run_without_torch(*args: object) -> subprocess.CompletedProcess:
    """Run infer.py in a fresh interpreter in which ``import torch`` fails."""
    code = (
        "import sys, runpy; sys.modules['torch'] = None; "
        f"sys.argv = ['infer.py'] + {[str(a) for a in args]!r}; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for photo in sample_photos():
        (folder / photo.name).write_bytes(photo.read_bytes())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)).save(folder / "tiny_rgba.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"
    run_export(
        ExportOptions(
            architecture=TINY,
            output=out,
            img_size=(64, 64),
            num_classes=10,
            labels=LABELS,
            samples=1,
        ),
        Progress(enabled=False),
    )
    return out


def test_text_output_without_torch(export_dir: Path, images: Path) -> None:
    result = run_without_torch(
        export_dir / "model.onnx", images, "--top-k", "3", "--batch-size", "2"
    )
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr
    blocks = result.stdout.strip().split("\n")
    headers = [line for line in blocks if not line.startswith("  ")]
    assert sorted(Path(h).name for h in headers) == sorted(
        ["china.jpg", "flower.jpg", "noise.png", "gray.png", "tiny_rgba.png"]
    )
    entries = [line.split() for line in blocks if line.startswith("  ")]
    assert len(entries) == 3 * len(headers)
    assert all(label in LABELS and 0 <= float(p) <= 1 for p, label in entries)


def test_json_output_matches_direct_onnxruntime(export_dir: Path, images: Path) -> None:
    result = run_without_torch(export_dir, images, "--json", "--top-k", "10")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 5
    session = ort.InferenceSession(str(export_dir / "model.onnx"))
    preprocess = Preprocessing((64, 64))
    for record in records:
        probs = [e["probability"] for e in record["top_k"]]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
        with Image.open(record["image"]) as image:
            logits = session.run(None, {"input": preprocess(image)[None]})[0][0]
        assert record["top_k"][0]["index"] == int(np.argmax(logits))
        assert record["top_k"][0]["label"] == LABELS[int(np.argmax(logits))]


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
def test_preprocessing_agrees_pixel_for_pixel(images: Path, crop_mode: str) -> None:
    script = load_script()
    for size in [(64, 64), (96, 160), (224, 224)]:
        for interpolation in ["bicubic", "bilinear"]:
            for crop_pct, mean, std in [
                (0.875, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                (0.9, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
                (1.0, (0.5,), (0.25,)),
            ]:
                settings = (size, mean, std, crop_pct, interpolation, crop_mode)
                ours, theirs = Preprocessing(*settings), script.Preprocessing(*settings)
                for path in sorted(images.glob("*.png")) + sorted(images.glob("c*.jpg")):
                    with Image.open(path) as image:
                        a, b = ours(image), theirs(image)
                    assert a.shape == (len(mean), *size)
                    assert np.array_equal(a, b), (path, settings)


def test_squash_export_is_preprocessed_as_recorded(tmp_path: Path, images: Path) -> None:
    """infer.py reads crop_mode (and mean, std, crop, interpolation) from the metadata; an
    export made before crop_mode was recorded is centre cropped; --crop-mode overrides."""
    settings = {"mean": (0.3, 0.4, 0.5), "std": (0.2, 0.3, 0.25), "crop_pct": 0.9}
    out = export_tiny(tmp_path / "squash", crop_mode="squash", interpolation="bilinear", **settings)
    session = ort.InferenceSession(str(out / "model.onnx"))

    def expected(crop_mode: str) -> dict[str, float]:
        pre = Preprocessing((64, 64), interpolation="bilinear", crop_mode=crop_mode, **settings)
        top = {}
        for path in [images / "china.jpg", images / "noise.png"]:
            with Image.open(path) as image:
                logits = session.run(None, {"input": pre(image)[None]})[0][0]
            probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            top[path.name] = float(probs.max())
        return top

    def probabilities(model: Path, *options: str) -> dict[str, float]:
        args = (images / "china.jpg", images / "noise.png", "--json", *options)
        result = run_without_torch(model, *args)
        assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in result.stdout.splitlines()]
        return {Path(r["image"]).name: r["top_k"][0]["probability"] for r in records}

    squashed, centred = expected("squash"), expected("center")
    assert abs(squashed["china.jpg"] - centred["china.jpg"]) > 1e-6  # the mode matters
    assert probabilities(out) == pytest.approx(squashed, abs=1e-6)
    assert probabilities(out, "--crop-mode", "center") == pytest.approx(centred, abs=1e-6)
    model = onnx.load(str(out / "model.onnx"))
    kept = [p for p in model.metadata_props if p.key != "crop_mode"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, tmp_path / "old.onnx")
    assert probabilities(tmp_path / "old.onnx") == pytest.approx(centred, abs=1e-6)


def test_fixed_batch_model_pads_the_last_batch(tmp_path: Path, images: Path) -> None:
    out = tmp_path / "fixed"
    run_export(
        ExportOptions(
            architecture=TINY, output=out, img_size=(64, 64), num_classes=10, batch=3, samples=1
        ),
        Progress(enabled=False),
    )
    result = run_without_torch(out, images, "--json")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 5


def test_model_without_metadata_needs_size(tmp_path: Path, export_dir: Path, images: Path) -> None:
    model = onnx.load(str(export_dir / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "bare.onnx")
    result = run_without_torch(tmp_path / "bare.onnx", images)
    assert result.returncode == 2
    assert "give --size H W" in result.stderr and "Traceback" not in result.stderr
    result = run_without_torch(tmp_path / "bare.onnx", images / "china.jpg", "--size", "64", "64")
    assert result.returncode == 0, result.stderr
    assert "china.jpg" in result.stdout


def test_missing_model_and_no_usable_image(tmp_path: Path, export_dir: Path, images: Path) -> None:
    result = run_without_torch(tmp_path / "nope.onnx", images)
    assert result.returncode == 2 and "not found" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_without_torch(export_dir, images / "broken.jpg")
    assert result.returncode == 1
    assert "no usable image" in result.stderr and "Traceback" not in result.stderr


def test_bench_command_end_to_end(tmp_path: Path, export_dir: Path, run_cli) -> None:
    out = tmp_path / "bench.json"
    result = run_cli(
        "bench",
        export_dir,
        "--threads",
        "1",
        "--batch",
        "1",
        "--batch",
        "2",
        "--runs",
        "5",
        "--warmup",
        "1",
        "--json",
        out,
    )
    assert result.code == 0, result.err
    assert "pytorch eager" in result.out and "onnx fp32" in result.out
    report = json.loads(out.read_text())
    rows = {(r["name"], r["batch"]) for r in report["results"]}
    assert rows == {("pytorch eager", 1), ("pytorch eager", 2), ("onnx fp32", 1), ("onnx fp32", 2)}
    for row in report["results"]:
        assert row["runs"] == 5 and 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["gflops_per_s"] > 0
    # the matmul ran in the same rounds as each batch; each row is a share of its rate
    peaks = report["matmul_gflops"]
    assert set(peaks) == {"1x1", "1x2"} and min(peaks.values()) > 0
    for row in report["results"]:
        expected = 100 * row["gflops_per_s"] / peaks[f"{row['threads']}x{row['batch']}"]
        assert row["pct_of_peak"] == pytest.approx(expected)
