"""predict: local worker processes and Ray Data on real photos, digits and broken files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from coatnet_export.preprocess import Preprocessing, open_image

from conftest import TINY_LABELS
from conftest import export_tiny as export
from test_infer import run_without_torch, sample_photos

pq = pytest.importorskip("pyarrow.parquet")
from train_fixture import write_images  # noqa: E402

LABELS = TINY_LABELS
BROKEN = ("broken.jpg", "empty.png")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Photos cropped to several sizes and modes, digits, a corrupt and an empty file."""
    root = tmp_path_factory.mktemp("images")
    photos = root / "photos"
    photos.mkdir()
    china, flower = (Image.open(p).convert("RGB") for p in sample_photos())
    china.save(photos / "china.jpg")
    flower.save(photos / "flower.jpg")
    china.crop((0, 0, 300, 100)).save(photos / "china_wide.png")
    china.crop((200, 50, 290, 350)).save(photos / "china_tall.jpg")
    flower.crop((100, 100, 131, 147)).save(photos / "flower_small.png")
    flower.convert("L").crop((0, 0, 250, 250)).save(photos / "flower_grey.png")
    write_images(root / "digits", np.arange(6))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image, and not named like one\n")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return export(tmp_path_factory.mktemp("export") / "tiny")


@pytest.fixture(scope="module")
def fixed(tmp_path_factory) -> Path:
    """Another model: batch fixed at 3, other weights."""
    return export(tmp_path_factory.mktemp("export") / "fixed", batch=3, seed=1)


def image_count(images: Path) -> int:
    return sum(1 for p in images.rglob("*") if p.suffix in (".jpg", ".png"))


def infer_top_k(model: Path, inputs: list[Path], top_k: int) -> dict[str, list[dict]]:
    """scripts/infer.py --json: top-k by image path."""
    result = run_without_torch(model, *inputs, "--json", "--top-k", top_k)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    return {record["image"]: record["top_k"] for record in records}


def read_rows(path: Path) -> dict[str, dict]:
    rows = pq.read_table(path).to_pylist()
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows), "a path appears twice"
    return by_path


def assert_rows_equal_infer(rows: dict[str, dict], expected: dict[str, list[dict]]) -> None:
    classified = {path for path, row in rows.items() if row["error"] is None}
    assert classified == set(expected)
    for path in classified:
        row, top = rows[path], expected[path]
        assert row["top_k_indices"] == [e["index"] for e in top], path
        assert row["top_k_labels"] == [e["label"] for e in top], path
        np.testing.assert_allclose(
            row["top_k_probabilities"], [e["probability"] for e in top], atol=1e-5
        )
    for path in set(rows) - classified:
        assert Path(path).name in BROKEN
        assert rows[path]["top_k_indices"] is None and rows[path]["top_k_probabilities"] is None


def test_local_rows_equal_infer(tiny: Path, images: Path, tmp_path: Path, run_cli) -> None:
    out, summary = tmp_path / "preds.parquet", tmp_path / "summary.json"
    result = run_cli(
        "predict", tiny, images, "--output", out, "--workers", "2", "--batch-size", "3",
        "--top-k", "3", "--json", summary,
    )  # fmt: skip
    assert result.code == 0, result.err
    rows = read_rows(out)
    assert len(rows) == image_count(images)
    assert_rows_equal_infer(rows, infer_top_k(tiny, [images], 3))
    errors = {Path(p).name: row["error"] for p, row in rows.items() if row["error"]}
    assert errors.keys() == set(BROKEN) and all(errors.values())
    sha = hashlib.sha256((tiny / "model.onnx").read_bytes()).hexdigest()
    assert {row["model_sha256"] for row in rows.values()} == {sha}
    # rows come in input order: folders walked in sorted order
    assert list(rows)[:3] == [str(images / n) for n in (*BROKEN, "digits/0/0000.png")]
    report = json.loads(summary.read_text())
    assert (report["images"], report["errors"], report["resumed"]) == (len(rows), 2, 0)
    assert report["workers"] == 2 and report["images_per_s"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fixed_batch_model_and_int8_choice(
    fixed: Path, images: Path, tmp_path: Path, run_cli
) -> None:
    out = tmp_path / "fixed.parquet"
    result = run_cli("predict", fixed, images / "photos", "--output", out, "--batch-size", "4")
    assert result.code == 0, result.err
    assert_rows_equal_infer(read_rows(out), infer_top_k(fixed, [images / "photos"], 5))
    missing = run_cli(
        "predict", fixed, images, "--output", tmp_path / "x.parquet", "--model", "int8"
    )
    assert missing.code == 2 and "model.int8.onnx" in missing.err


def test_resume_skips_done_images(
    tiny: Path, fixed: Path, images: Path, tmp_path: Path, run_cli
) -> None:
    out = tmp_path / "preds.parquet"
    first = run_cli("predict", tiny, images / "photos", "--output", out, "--workers", "1")
    assert first.code == 0, first.err
    before = read_rows(out)
    again = run_cli("predict", tiny, images, "--output", out)
    assert again.code == 2 and "--resume" in again.err
    summary = tmp_path / "summary.json"
    resumed = run_cli("predict", tiny, images, "--output", out, "--resume", "--json", summary)
    assert resumed.code == 0, resumed.err
    rows = read_rows(out)
    assert len(rows) == image_count(images)
    assert all(rows[path] == row for path, row in before.items())
    report = json.loads(summary.read_text())
    assert report["resumed"] == len(before) and report["images"] == len(rows) - len(before)
    refused = run_cli("predict", fixed, images, "--output", out, "--resume")
    assert refused.code == 2 and "another model" in refused.err
    assert read_rows(out) == rows
    forced = run_cli("predict", fixed, images / "digits", "--output", out, "--force")
    assert forced.code == 0, forced.err
    assert len(read_rows(out)) == 6


@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")
def test_ray_engine_resumes_a_local_run(
    tiny: Path, images: Path, tmp_path: Path, run_cli, monkeypatch
) -> None:
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    out, summary = tmp_path / "preds.parquet", tmp_path / "summary.json"
    assert run_cli("predict", tiny, images / "digits", "--output", out).code == 0
    done = len(read_rows(out))
    inputs = [images / "photos", images / "digits", str(images / "*.jpg"), images / "empty.png"]
    result = run_cli(
        "predict", tiny, *inputs, "--output", out, "--engine", "ray", "--workers", "1",
        "--batch-size", "4", "--top-k", "3", "--resume", "--json", summary,
    )  # fmt: skip
    assert result.code == 0, result.err
    rows = read_rows(out)
    assert len(rows) == image_count(images)
    report = json.loads(summary.read_text())
    assert (report["engine"], report["resumed"], report["errors"]) == ("ray", done, 2)
    assert report["images"] == len(rows) - done
    ray_rows = {p: r for p, r in rows.items() if "digits" not in p}
    assert_rows_equal_infer(ray_rows, infer_top_k(tiny, [images / "photos"], 3))


def test_bad_requests(tiny: Path, images: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "preds.parquet"
    cases = {
        "does not exist": ("predict", tiny, tmp_path / "nowhere", "--output", out),
        "matches no file": ("predict", tiny, str(tmp_path / "*.jpg"), "--output", out),
        "--engine ray": ("predict", tiny, "s3://bucket/images/", "--output", out),
        "for --engine ray": ("predict", tiny, images, "--output", out, "--address", "x:1"),
        "must end in .parquet": ("predict", tiny, images, "--output", tmp_path / "p.csv"),
        "no image files": ("predict", tiny, images / "digits" / "nothing", "--output", out),
    }
    (images / "digits" / "nothing").mkdir(exist_ok=True)
    for message, args in cases.items():
        result = run_cli(*args)
        assert result.code == 2 and message in result.err, (message, result.err)
        assert "Traceback" not in result.err
    bare = tmp_path / "bare.onnx"
    model = onnx.load(str(tiny / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, bare)
    result = run_cli("predict", bare, images, "--output", out)
    assert result.code == 2 and "metadata" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.onnx"]


def test_squash_export_rows_equal_infer_and_the_recorded_preprocessing(
    images: Path, tmp_path: Path, run_cli
) -> None:
    """crop_mode squash, non-default mean, std, crop and interpolation: predict computes what
    infer.py computes, and both are the recorded Preprocessing (not the centre crop)."""
    settings = {"mean": (0.3, 0.4, 0.5), "std": (0.2, 0.3, 0.25), "crop_pct": 0.9}
    model = export(
        tmp_path / "squash", crop_mode="squash", interpolation="bilinear", seed=2, **settings
    )
    out = tmp_path / "preds.parquet"
    photos = images / "photos"
    result = run_cli("predict", model, photos, "--output", out, "--workers", "1", "--top-k", "10")
    assert result.code == 0, result.err
    rows = read_rows(out)
    assert_rows_equal_infer(rows, infer_top_k(model, [photos], 10))
    session = ort.InferenceSession(str(model / "model.onnx"))
    moved = 0
    for crop_mode in ("squash", "center"):
        pre = Preprocessing((64, 64), interpolation="bilinear", crop_mode=crop_mode, **settings)
        for path, row in rows.items():
            logits = session.run(None, {"input": pre(open_image(Path(path)))[None]})[0][0]
            probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            found = np.asarray(row["top_k_probabilities"])
            close = np.allclose(probs[row["top_k_indices"]], found, atol=1e-5)
            assert close or crop_mode == "center", path
            moved += not close
    assert moved >= 3  # the wide, tall and small photos change with the crop mode
