"""The web target: a static site that classifies images in the browser with onnxruntime-web.

The site holds the export's e2e models (uint8 pixels in, logits out: preprocessing is in the
graph, so the browser never resizes), the labels and metadata as JSON, the page (index.html,
app.js, style.css, and serve.py for the headers that give threads) and the onnxruntime-web
files, copied from a local npm install or referenced on a CDN.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import onnx

from coatnet_export.describe import load_proto, metadata_of
from coatnet_export.errors import InputError, writing
from coatnet_export.layout import E2E_FILE, E2E_INT8_FILE, data_file
from coatnet_export.metadata import ExportMetadata, write_json
from coatnet_export.output import claim, publish, staging
from coatnet_export.targets import PackageOptions, PackageOutcome

E2E_MODELS = {"int8": E2E_INT8_FILE, "fp32": E2E_FILE}
"""The e2e model files an export directory may hold, by kind (int8 first: the default)."""

MODEL_CHOICES = ("auto", "int8", "fp32")
TEMPLATE_FILES = ("index.html", "app.js", "style.css", "serve.py")
ORT_WEB_VERSION = "1.30.0"
"""The onnxruntime-web release the page is tested with (tests/browser/package.json pins it)."""
ORT_SCRIPT = "ort.wasm.min.mjs"
ORT_FILES = (ORT_SCRIPT, "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
"""The WebAssembly (CPU) build of onnxruntime-web: the API module and the runtime it loads."""
ORT_WEB_ENV = "COATNET_ORT_WEB_DIR"
NPM_HINT = (
    f"run `npm install onnxruntime-web@{ORT_WEB_VERSION}` and pass "
    "--ort-web-dir node_modules/onnxruntime-web (in a coatnet-export checkout, "
    "`npm ci --prefix tests/browser` is found without the option), or reference a CDN with "
    f"--ort-web-cdn https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_WEB_VERSION}/dist/"
)
PAGE_METADATA = (
    "variant",
    "img_size",
    "in_channels",
    "num_classes",
    "mean",
    "std",
    "crop_pct",
    "interpolation",
    "crop_mode",
    "quantization",
    "versions",
)
"""The metadata fields the page shows (config.json carries them)."""


@dataclass
class SiteModel:
    """One model the page can run."""

    kind: str
    file: str
    bytes: int


@dataclass
class WebSite:
    """What :func:`write_site` wrote."""

    output: Path
    models: list[SiteModel]
    default: str
    runtime: str
    """Where the page loads onnxruntime-web from: the copied files' source, or the CDN."""
    runtime_version: str | None
    bytes: int


def write_site(
    export_dir: Path,
    output: Path,
    *,
    model: str = "auto",
    ort_web_dir: Path | None = None,
    cdn: str | None = None,
    force: bool = False,
) -> WebSite:
    """Write the static site for ``export_dir``'s e2e models to ``output``, whole or not at all.

    ``model`` picks the model the page opens with: ``auto`` (int8 when the export has one),
    ``int8`` or ``fp32``; every e2e model is copied, so the page can switch. onnxruntime-web
    comes from ``ort_web_dir`` (an npm install; searched for when None) or, with ``cdn``, from
    that URL.
    """
    models = find_models(export_dir)
    default = choose_default(models, model)
    metadata = read_metadata(models[default])
    if cdn is not None:
        runtime, version, ort_dist = check_cdn(cdn), None, None
    else:
        ort_dist = find_ort_web(ort_web_dir)
        runtime, version = str(ort_dist), ort_web_version(ort_dist)
    inputs = [export_dir, *([ort_dist] if ort_dist else [])]
    with claim(output, force, inputs) as final, staging(final) as stage, writing(final):
        copy_templates(stage)
        site_models = copy_models(models, stage / "models")
        if ort_dist is not None:
            copy_runtime(ort_dist, stage / "ort")
        base = runtime if cdn is not None else "ort/"
        config = site_config(metadata, site_models, default, base, version)
        write_json(stage / "config.json", config)
        size = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
        publish(stage, final)
    return WebSite(final, site_models, default, runtime, version, size)


def find_models(export_dir: Path) -> dict[str, Path]:
    """The e2e models in an export directory, by kind; InputError when there are none."""
    if not export_dir.is_dir():
        raise InputError(f"export directory {export_dir} does not exist")
    found = {kind: export_dir / name for kind, name in E2E_MODELS.items()}
    found = {kind: path for kind, path in found.items() if path.is_file()}
    if not found:
        raise InputError(
            f"{export_dir} has no e2e model (run `coatnet-export package {export_dir} "
            "--target e2e` first)"
        )
    for path in found.values():
        check_e2e_signature(path)
    return found


def choose_default(models: dict[str, Path], model: str) -> str:
    """The kind the page opens with."""
    if model not in MODEL_CHOICES:
        raise InputError(f"unknown model {model!r} (choose one of {', '.join(MODEL_CHOICES)})")
    if model == "auto":
        return next(iter(models))
    if model not in models:
        raise InputError(
            f"the export has no {E2E_MODELS[model]} (quantize it, then run "
            "`coatnet-export package DIR --target e2e` again; or choose another --model)"
        )
    return model


def check_e2e_signature(path: Path) -> None:
    """An e2e model takes ``image`` uint8 [1, H, W, 3] and holds its weights in one file."""
    graph = load_proto(path).graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    tensor = inputs[0].type.tensor_type if len(inputs) == 1 else None
    if (
        tensor is None
        or inputs[0].name != "image"
        or tensor.elem_type != onnx.TensorProto.UINT8
        or len(tensor.shape.dim) != 4
        or tensor.shape.dim[3].dim_value != 3
    ):
        raise InputError(
            f"{path} is not an e2e model: it must take one input `image`, uint8 [1, H, W, 3] "
            "(run `coatnet-export package DIR --target e2e` again)"
        )
    if data_file(path).exists():
        raise InputError(
            f"{path} keeps its weights in {data_file(path).name}: a model over 2 GiB does "
            "not fit a browser's WebAssembly memory (export a smaller variant, or int8)"
        )


def read_metadata(path: Path) -> ExportMetadata:
    """The coatnet-export metadata of an e2e model."""
    metadata = metadata_of(load_proto(path))
    if metadata is None:
        raise InputError(
            f"{path} has no coatnet-export metadata (re-run `coatnet-export package DIR "
            "--target e2e` on an export made by coatnet-export)"
        )
    return metadata


def check_cdn(url: str) -> str:
    """A CDN folder URL that holds onnxruntime-web's dist files, ending in ``/``."""
    if not url.startswith(("https://", "http://")):
        raise InputError(
            f"--ort-web-cdn {url!r} is not an http(s) URL (e.g. "
            f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_WEB_VERSION}/dist/)"
        )
    return url if url.endswith("/") else url + "/"


def find_ort_web(ort_web_dir: Path | None) -> Path:
    """The folder holding onnxruntime-web's dist files, from the option or the usual places."""
    if ort_web_dir is not None:
        places = [ort_web_dir]
    else:
        checkout = Path(__file__).resolve().parents[3]
        places = [Path(p) for p in [os.environ.get(ORT_WEB_ENV)] if p]
        places += [checkout / "tests" / "browser", Path.cwd()]
    for place in places:
        for candidate in (
            place,
            place / "dist",
            place / "onnxruntime-web" / "dist",
            place / "node_modules" / "onnxruntime-web" / "dist",
        ):
            if all((candidate / name).is_file() for name in ORT_FILES):
                return candidate
    searched = ", ".join(str(p) for p in places)
    raise InputError(f"onnxruntime-web's {ORT_SCRIPT} not found in {searched} ({NPM_HINT})")


def ort_web_version(dist: Path) -> str | None:
    """The onnxruntime-web version of an npm install's dist folder, if it says."""
    manifest = dist.parent / "package.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text()).get("version")
    except (json.JSONDecodeError, OSError):
        return None


def copy_templates(stage: Path) -> None:
    """The page itself: the files beside this module."""
    package = resources.files(__package__)
    for name in TEMPLATE_FILES:
        (stage / name).write_bytes(package.joinpath(name).read_bytes())


def copy_models(models: dict[str, Path], folder: Path) -> list[SiteModel]:
    """Copy the e2e models into the site."""
    folder.mkdir()
    copied = []
    for kind, path in models.items():
        shutil.copyfile(path, folder / path.name)
        copied.append(SiteModel(kind, f"{folder.name}/{path.name}", path.stat().st_size))
    return copied


def copy_runtime(dist: Path, folder: Path) -> None:
    """Copy onnxruntime-web's WebAssembly build into the site."""
    folder.mkdir()
    for name in ORT_FILES:
        shutil.copyfile(dist / name, folder / name)


def site_config(
    metadata: ExportMetadata,
    models: list[SiteModel],
    default: str,
    base: str,
    version: str | None,
) -> dict[str, Any]:
    """config.json: what the page loads, and what it shows."""
    labels = metadata.labels or [str(i) for i in range(metadata.num_classes)]
    return {
        "models": {m.kind: {"file": m.file, "bytes": m.bytes} for m in models},
        "default": default,
        "labels": labels,
        "metadata": {key: getattr(metadata, key) for key in PAGE_METADATA},
        "runtime": {"base": base, "script": ORT_SCRIPT, "version": version},
    }


def build(request: PackageOptions) -> PackageOutcome:
    """``coatnet-export package DIR --target web --output SITE``: :func:`write_site`."""
    if request.output is None:
        raise InputError("--target web writes a new folder: give --output SITE")
    options = request.options
    site = write_site(
        request.export_dir,
        request.output,
        model=options.get("web_model") or "auto",
        ort_web_dir=options.get("ort_web_dir"),
        cdn=options.get("ort_web_cdn"),
        force=request.force,
    )
    rows = [
        {"model": m.kind, "file": m.file, "bytes": m.bytes, "default": m.kind == site.default}
        for m in site.models
    ]
    version = f" (onnxruntime-web {site.runtime_version})" if site.runtime_version else ""
    notes = [
        f"onnxruntime-web from {site.runtime}{version}",
        f"serve it: python {site.output / 'serve.py'} (threads), or any static server; "
        "then open http://127.0.0.1:8000/",
    ]
    return PackageOutcome(files=[site.output], table=rows, notes=notes)
