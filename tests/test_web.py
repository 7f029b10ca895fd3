"""The web target: the site it writes, and that site classifying in a real Chromium.

The browser tests serve the site on loopback, drive Debian's chromium through playwright-core
(tests/browser/drive.mjs) and compare the page's top-5 with scripts/infer.py's on the same
e2e model and image files. They need chromium, node and ``npm ci --prefix tests/browser``;
without them they are skipped with that reason.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coatnet_export.errors import InputError
from coatnet_export.targets import PackageOptions
from coatnet_export.targets.web import ORT_FILES, build, write_site

from conftest import TINY_LABELS, export_tiny

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "digits"
BROWSER = ROOT / "tests" / "browser"
DRIVER = BROWSER / "drive.mjs"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
from train_fixture import digit_images, split, write_images  # noqa: E402

TOLERANCE = 1e-2
"""Largest difference between a probability on the page and infer.py's."""


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if shutil.which("node") is None:
        missing.append("node (apt-get install nodejs npm)")
    for package in ("playwright-core", "onnxruntime-web"):
        if not (BROWSER / "node_modules" / package).is_dir():
            missing.append(f"{package} (npm ci --prefix tests/browser)")
    return f"the browser test needs {', '.join(missing)}" if missing else None


needs_browser = pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))


def coatnet_export(*args: str | Path) -> None:
    """Run the command line as a user would; fail with its output if it fails."""
    command = [sys.executable, "-m", "coatnet_export", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command[2:])}:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """The digits fixture exported, quantized and packaged as e2e models; and test images."""
    root = tmp_path_factory.mktemp("web")
    train, test = split()
    write_images(root / "calibration", train[:64])
    write_images(root / "eval", test[:60])
    export = root / "digits"
    coatnet_export(
        "export",
        "--checkpoint", FIXTURE / "digits.safetensors",
        "--labels", FIXTURE / "labels.txt",
        "--mean", "0.5", "--std", "0.5", "--crop-pct", "1.0",
        "--samples", "1", "--quiet",
        "--output", export,
        "--quantize", "static",
        "--calibration-data", root / "calibration",
        "--eval-data", root / "eval",
    )  # fmt: skip
    coatnet_export("package", export, "--target", "e2e")
    fp32_only = root / "digits-fp32"
    fp32_only.mkdir()
    shutil.copy(export / "model.e2e.onnx", fp32_only)
    return {"export": export, "fp32_only": fp32_only, "images": photos(root / "images", test)}


def photos(folder: Path, test: np.ndarray) -> list[Path]:
    """Held-out digits as stored (8x8 PNG), and larger colour files of other shapes and formats."""
    images, _ = digit_images()
    folder.mkdir()
    paths = []
    for i in test[:8]:
        paths.append(folder / f"digit-{i}.png")
        images[i].save(paths[-1])
    shapes = [((40, 56), "jpeg"), ((97, 61), "png"), ((300, 300), "webp"), ((23, 31), "bmp")]
    for i, (size, suffix) in zip(test[8:], shapes, strict=False):
        paths.append(folder / f"photo-{i}-{size[0]}x{size[1]}.{suffix}")
        colour = images[i].convert("RGB").resize(size, Image.Resampling.BICUBIC)
        colour.save(paths[-1], **({"quality": 90} if suffix == "jpeg" else {}))
    return paths


def infer_probabilities(model: Path, images: list[Path]) -> dict[str, np.ndarray]:
    """Every class's probability per image, from scripts/infer.py --json on ``model``."""
    return infer_probabilities_with(model, images)


def infer_probabilities_with(model: Path, images: list[Path], *options: str) -> dict:
    """:func:`infer_probabilities` with infer.py's ``options``."""
    command = [sys.executable, str(ROOT / "scripts" / "infer.py"), str(model)]
    command += [*map(str, images), "--json", "--top-k", "1000", *options]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    probabilities = {}
    for line in result.stdout.splitlines():
        entry = json.loads(line)
        ranked = sorted(entry["top_k"], key=lambda e: e["index"])
        probabilities[Path(entry["image"]).name] = np.array([e["probability"] for e in ranked])
    return probabilities


@contextlib.contextmanager
def serve(site: Path, isolated: bool) -> Iterator[str]:
    """Serve ``site`` on loopback from a thread: with the site's own serve.py headers or none."""
    handler = http.server.SimpleHTTPRequestHandler
    if isolated:
        spec = importlib.util.spec_from_file_location("site_serve", site / "serve.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        handler = module.IsolatedHandler
    quiet = type("Quiet", (handler,), {"log_message": lambda *args: None})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(quiet, directory=str(site))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def drive(plan: dict, folder: Path) -> dict:
    """Run tests/browser/drive.mjs on ``plan``; its JSON report."""
    plan_path = folder / "plan.json"
    plan_path.write_text(json.dumps({"chromium": str(CHROMIUM), **plan}))
    result = subprocess.run(
        ["node", str(DRIVER), str(plan_path)], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, f"drive.mjs failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def check_agreement(page: list[dict], model: Path, images: list[Path]) -> None:
    """Same top-1 as infer.py on every image, every shown probability within TOLERANCE."""
    reference = infer_probabilities(model, images)
    assert [Path(r["image"]).name for r in page] == [p.name for p in images]
    for run in page:
        expected = reference[Path(run["image"]).name]
        assert run["state"] == "done", run
        assert run["top"][0]["index"] == int(expected.argmax()), run
        assert len(run["top"]) == 5
        for entry in run["top"]:
            assert entry["label"] == str(entry["index"])  # the digits' labels are "0".."9"
            assert abs(entry["probability"] - expected[entry["index"]]) <= TOLERANCE, run


@needs_browser
@pytest.mark.browser
def test_page_agrees_with_infer_for_int8_and_fp32(exports, tmp_path: Path) -> None:
    site = tmp_path / "site"
    written = write_site(exports["export"], site)
    assert written.default == "int8"
    images = exports["images"]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(images[0].read_bytes()[:60])
    screenshot = tmp_path / "page.png"
    with serve(site, isolated=True) as url:
        report = drive(
            {
                "url": url + "?warm=1",
                "steps": [
                    {"model": "int8", "images": [str(p) for p in images]},
                    {"model": "fp32", "images": [str(p) for p in images]},
                ],
                "corrupt": str(corrupt),
                "screenshot": str(screenshot),
            },
            tmp_path,
        )
    results = report["results"]
    check_agreement(
        [r for r in results if r["model"] == "int8"], site / written.models[0].file, images
    )
    check_agreement(
        [r for r in results if r["model"] == "fp32"], site / written.models[1].file, images
    )
    assert report["isolated"] and report["threads"] >= 1 and not report["isolationNote"]
    assert all(r["firstMs"] > 0 and r["warmMs"] > 0 for r in results)
    assert report["corrupt"]["state"] == "error"
    assert "corrupt.png could not be decoded as an image: " in report["corrupt"]["error"]
    assert report["corrupt"]["results"] == 0 and not report["corrupt"]["preview"]
    assert report["consoleErrors"] == []
    assert report["elsewhere"] == []  # everything comes from the site: it works offline
    assert screenshot.stat().st_size > 10_000


@needs_browser
@pytest.mark.browser
def test_page_without_isolation_runs_one_thread_says_why_and_takes_the_camera(
    exports, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    write_site(exports["fp32_only"], site)
    image = exports["images"][0]
    with serve(site, isolated=False) as url:
        plan = {"url": url, "steps": [{"model": "fp32", "images": [str(image)]}], "camera": "fp32"}
        report = drive(plan, tmp_path)
    assert not report["isolated"]
    assert report["threads"] == 1
    assert report["isolationNote"]
    check_agreement(report["results"], site / "models" / "model.e2e.onnx", [image])
    camera = report["camera"]  # Chromium's fake camera: a frame goes through the same model
    assert camera["state"] == "done" and camera["top"] == 5, camera
    assert camera["info"].startswith("camera frame, "), camera
    assert report["consoleErrors"] == [] and report["elsewhere"] == []


def test_cdn_site_holds_the_page_models_and_config(exports, tmp_path: Path) -> None:
    site = tmp_path / "site"
    cdn = "https://cdn.jsdelivr.net/npm/onnxruntime-web@1.30.0/dist"
    written = write_site(exports["export"], site, model="fp32", cdn=cdn)
    assert written.default == "fp32" and written.runtime == cdn + "/"
    files = {str(p.relative_to(site)) for p in site.rglob("*") if p.is_file()}
    assert files == {
        "index.html",
        "app.js",
        "style.css",
        "serve.py",
        "config.json",
        "models/model.e2e.int8.onnx",
        "models/model.e2e.onnx",
    }
    for model in written.models:
        assert (site / model.file).read_bytes() == (
            exports["export"] / Path(model.file).name
        ).read_bytes()
    config = json.loads((site / "config.json").read_text())
    assert config["default"] == "fp32"
    assert config["runtime"] == {"base": cdn + "/", "script": ORT_FILES[0], "version": None}
    assert config["labels"] == [str(i) for i in range(10)]
    assert config["metadata"]["img_size"] == [64, 64]
    assert {k: m["bytes"] for k, m in config["models"].items()} == {
        m.kind: (site / m.file).stat().st_size for m in written.models
    }
    assert written.bytes == sum((site / f).stat().st_size for f in files)


def test_bad_input_names_the_fix_and_writes_nothing(exports, tmp_path: Path) -> None:
    site = tmp_path / "site"
    not_e2e = tmp_path / "not-e2e"
    not_e2e.mkdir()
    shutil.copy(exports["export"] / "model.onnx", not_e2e / "model.e2e.onnx")
    cases = [
        ({"export_dir": tmp_path}, "has no e2e model \\(run `coatnet-export package"),
        ({"export_dir": tmp_path / "nowhere"}, "does not exist"),
        ({"model": "int8"}, "has no model.e2e.int8.onnx"),
        ({"model": "fp16"}, "unknown model 'fp16'"),
        ({"export_dir": not_e2e}, "is not an e2e model"),
        ({"ort_web_dir": tmp_path / "nowhere"}, "not found in .*npm install onnxruntime-web@"),
        ({"cdn": "ftp://example.org/ort/"}, "is not an http\\(s\\) URL"),
    ]
    for overrides, message in cases:
        kwargs = {"export_dir": exports["fp32_only"], "output": site, **overrides}
        with pytest.raises(InputError, match=message):
            write_site(**kwargs)
    assert list(tmp_path.glob("*site*")) == []
    site.mkdir()
    (site / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists; pass --force"):
        write_site(exports["fp32_only"], site, cdn="https://example.org/ort/")
    assert [p.name for p in site.iterdir()] == ["keep.txt"]
    write_site(exports["fp32_only"], site, cdn="https://example.org/ort/", force=True)
    assert not (site / "keep.txt").exists() and (site / "index.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-e2e", "site"]


def test_package_target_builds_the_site_into_output(exports, tmp_path: Path) -> None:
    cdn = "https://cdn.example.org/onnxruntime-web/dist/"
    with pytest.raises(InputError, match="give --output SITE"):
        build(
            PackageOptions(target="web", export_dir=exports["export"], options={"ort_web_cdn": cdn})
        )
    site = tmp_path / "site"
    options = {"web_model": "fp32", "ort_web_dir": None, "ort_web_cdn": cdn}
    result = build(
        PackageOptions(target="web", export_dir=exports["export"], output=site, options=options)
    )
    assert result.files == [site]
    assert [(row["model"], row["default"]) for row in result.table] == [
        ("int8", False),
        ("fp32", True),
    ]
    assert any(cdn in note for note in result.notes)
    assert json.loads((site / "config.json").read_text())["default"] == "fp32"


@pytest.fixture(scope="module")
def squashed(tmp_path_factory) -> dict[str, Path | list[Path]]:
    """A seeded TINY export recorded with timm's squash, non-default mean, std, crop and
    interpolation, packaged as an e2e model; and photos of several shapes."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("squash")
    export = export_tiny(root / "export", seed=2, **SQUASH)
    coatnet_export("package", export, "--target", "e2e")
    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    images = []
    for name, image in [
        ("wide.jpg", china.crop((0, 0, 400, 90))),
        ("tall.png", flower.crop((200, 0, 260, 420))),
        ("small.png", flower.resize((37, 23), Image.Resampling.BICUBIC)),
        ("photo.jpg", china),
    ]:
        images.append(root / name)
        image.save(images[-1])
    return {"export": export, "images": images}


SQUASH = {
    "crop_mode": "squash",
    "crop_pct": 0.9,
    "mean": (0.3, 0.4, 0.5),
    "std": (0.2, 0.3, 0.25),
    "interpolation": "bilinear",
}


@needs_browser
@pytest.mark.browser
def test_page_preprocesses_a_squash_export_as_infer_does(squashed, tmp_path: Path) -> None:
    """The page's probabilities are infer.py's on model.onnx with Pillow and the recorded
    squash (the e2e graph computes Pillow's pixels), not those of a centre crop."""
    site = tmp_path / "site"
    write_site(squashed["export"], site)
    images = squashed["images"]
    with serve(site, isolated=True) as url:
        report = drive(
            {"url": url, "steps": [{"model": "fp32", "images": list(map(str, images))}]}, tmp_path
        )
    model = squashed["export"] / "model.onnx"
    reference = infer_probabilities(model, images)
    centred = infer_probabilities_with(model, images, "--crop-mode", "center")
    assert [Path(r["image"]).name for r in report["results"]] == [p.name for p in images]
    moved = 0
    for run in report["results"]:
        name = Path(run["image"]).name
        expected, other = reference[name], centred[name]
        assert run["state"] == "done" and len(run["top"]) == 5, run
        for entry in run["top"]:
            assert entry["label"] == TINY_LABELS[entry["index"]]
            assert abs(entry["probability"] - expected[entry["index"]]) < 1e-4, run
            moved += abs(entry["probability"] - other[entry["index"]]) > 1e-3
    assert moved > 0  # a centre crop would have shown other probabilities
    assert report["consoleErrors"] == []
    config = json.loads((site / "config.json").read_text())
    assert config["metadata"]["crop_mode"] == "squash"
