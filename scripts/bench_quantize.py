"""Benchmark int8 quantization: every variant's cost and result, and the recipes compared.

    python scripts/bench_quantize.py --variants coatnet_0 --images 16,64,128
    python scripts/bench_quantize.py --variants coatnet_2,coatnet_5 --images 64 --json out.json
    python scripts/bench_quantize.py --recipes

1. Variants (``--variants``, default all eight): each is exported with seeded weights (a
   `coatnet-export` subprocess), then `coatnet-export quantize` runs as a measured subprocess
   for each ``--images`` count of calibration images (crops of scikit-learn's sample
   photographs; 16 other crops are held out). The table: wall time and peak RSS of the
   quantize command (its process tree's, ``run_measured``), peak RSS over the fp32 weight
   bytes, int8 size over fp32 size, the gate's metric and value, top-1 agreement, and the
   batch-1 speed-up.
2. Recipes (``--recipes``): for each quantization recipe (which ops become int8, which int8
   results stay float, whether attention is split), coatnet_0 int8 vs fp32 p50 latency at
   batch 1 and 8 in onnxruntime and, where it is installed, OpenVINO (fp32 and every recipe
   interleaved in one run per runtime and batch); and on the digits fixture (trained, see
   scripts/train_fixture.py), in onnxruntime, top-1 agreement with fp32, accuracy of both and
   the smallest cosine similarity over the 360 held-out images.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from PIL import Image

from coatnet_export.bench import run_measured
from coatnet_export.console import Progress, render_table
from coatnet_export.export.pipeline import ExportOptions, run_export
from coatnet_export.preprocess import Preprocessing
from coatnet_export.quantize import (
    RECIPES,
    SessionPlan,
    agreement,
    calibrate_ranges,
    choose_types,
    image_inputs,
    latency,
    logits,
    prepare,
    quantize_once,
)
from coatnet_export.runtimes import RUNTIMES
from models import VARIANTS, get_variant

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from train_fixture import PREPROCESSING, export_options, split, write_images  # noqa: E402

HELD_OUT = 16
VARIANT_COLUMNS = (
    "variant",
    "images",
    "wall_s",
    "peak_rss_gib",
    "peak_over_weights",
    "fp32_mib",
    "int8_mib",
    "int8_share",
    "gate",
    "top1_agreement",
    "min_cosine",
    "speedup_b1",
)


def photo_crops(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` deterministic random crops of scikit-learn's sample photographs."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    folder.mkdir(parents=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(160, 400))
        top = int(rng.integers(0, photo.shape[0] - side))
        left = int(rng.integers(0, photo.shape[1] - side))
        Image.fromarray(photo[top : top + side, left : left + side]).save(folder / f"{i:03d}.jpg")


def coatnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "coatnet_export", *args]


def bench_variant(name: str, counts: list[int], work: Path, args) -> list[dict]:
    """Export ``name`` (seeded; an export already in --exports is reused), then quantize it
    once per calibration image count."""
    export = (args.exports or work) / name
    export_peak = None
    if not (export / "model.onnx").is_file():
        print(f"exporting {name} ...", file=sys.stderr)
        exported = run_measured(
            coatnet("--variant", name, "--output", str(export), "--no-validate")
        )
        if exported.returncode != 0:
            print(exported.output[-3000:], file=sys.stderr)
            return [{"variant": name, "gate": f"export failed ({exported.returncode})"}]
        export_peak = exported.peak_rss_bytes / 2**30
    fp32_bytes = sum(p.stat().st_size for p in export.glob("model.onnx*"))
    rows = []
    for count in counts:
        print(f"quantizing {name} with {count} images ...", file=sys.stderr)
        run = run_measured(
            coatnet(
                "quantize",
                str(export),
                "--calibration-data",
                str(work / f"photos{count}"),
                "--calibration-samples",
                str(count),
                "--eval-data",
                str(work / "held_out"),
                "--threads",
                str(args.threads),
                "--latency-runs",
                str(args.runs),
            )
        )
        if run.returncode not in (0, 1):
            print(run.output[-3000:], file=sys.stderr)
            rows.append({"variant": name, "images": count, "gate": f"failed ({run.returncode})"})
            continue
        report = json.loads((export / "quantization.json").read_text())
        gate = report["gate"]
        rows.append(
            {
                "variant": name,
                "images": count,
                "wall_s": run.wall_s,
                "peak_rss_gib": run.peak_rss_bytes / 2**30,
                "peak_over_weights": run.peak_rss_bytes / fp32_bytes,
                "fp32_mib": report["sizes"]["fp32"] / 2**20,
                "int8_mib": report["sizes"]["int8"] / 2**20,
                "int8_share": report["sizes"]["int8"] / report["sizes"]["fp32"],
                "gate": f"{gate['metric']} {gate['value']:.4f}"
                + ("" if report["passed"] else " FAILED"),
                "top1_agreement": report["agreement"]["top1"],
                "min_cosine": report["agreement"]["min_cosine"],
                "speedup_b1": report["speedup"],
                "export_peak_rss_gib": export_peak,
                "low_memory_sessions": report["low_memory_sessions"],
                "notes": report["notes"],
            }
        )
        print(render_table(rows[-1:], VARIANT_COLUMNS), file=sys.stderr)
    if args.exports is None:
        for path in export.glob("model*.onnx*"):
            path.unlink()
    return rows


def bench_recipes(work: Path, args) -> list[dict]:
    """Every recipe: coatnet_0 speed against fp32, digits accuracy against fp32."""
    print("exporting coatnet_0 and the digits fixture ...", file=sys.stderr)
    c0 = run_export(
        ExportOptions(architecture=get_variant("coatnet_0"), output=work / "c0", validate=False),
        Progress(enabled=False),
    ).directory
    digits = run_export(
        export_options(work / "digits", labels=None, validate=False), Progress(enabled=False)
    ).directory
    train, test = split()
    write_images(work / "digits_calibration", train[:64])
    write_images(work / "digits_test", test)
    labels = [str(d) for d in range(10)]
    photos, _ = image_inputs(work / "photos16", Preprocessing((224, 224)), None, 16)
    calibration, _ = image_inputs(work / "digits_calibration", PREPROCESSING, labels, 64)
    held_out, _ = image_inputs(work / "digits_test", PREPROCESSING, labels, 1000)
    plan = SessionPlan(args.threads, False, 1, False)
    choice = choose_types("auto")
    prepared = {}  # (model, split attention) -> (prepared model, calibration cache)
    for model, inputs in ((c0, photos), (digits, calibration)):
        for split_attention in sorted({r.split_attention for r in RECIPES.values()}):
            folder = model / f"prepared-{int(split_attention)}"
            folder.mkdir()
            prepare(model / "model.onnx", folder / "pre.onnx", split_attention=split_attention)
            cache = calibrate_ranges(
                folder / "pre.onnx", inputs, None, "minmax", plan, lambda n: None
            )
            prepared[model, split_attention] = folder / "pre.onnx", cache
    reference = logits(digits / "model.onnx", held_out, SessionPlan(args.threads, False, 8, False))
    rows: list[dict[str, Any]] = []
    c0_int8: dict[str, Path] = {}
    for index, recipe in enumerate(RECIPES.values()):
        print(f"recipe {recipe.name} ...", file=sys.stderr)
        outputs = {}
        for model in (c0, digits):
            outputs[model] = model / f"recipe{index}.onnx"
            pre, cache = prepared[model, recipe.split_attention]
            exclude = recipe.exclusions(onnx.load(str(pre), load_external_data=False))
            quantize_once(pre, outputs[model], choice, recipe, cache, exclude)
        c0_int8[recipe.name] = outputs[c0]
        int8 = logits(outputs[digits], held_out, SessionPlan(args.threads, False, 8, False))
        agree = agreement(reference, int8, held_out.targets)
        rows.append(
            {
                "recipe": recipe.name,
                "top1_agreement": agree.top1,
                "fp32_accuracy": agree.fp32_accuracy,
                "int8_accuracy": agree.int8_accuracy,
                "min_cosine": agree.min_cosine,
            }
        )
    runtimes = [r for r in RUNTIMES if importlib.util.find_spec(r) is not None]
    for runtime, batch in itertools.product(runtimes, (1, 8)):
        print(f"timing fp32 and every recipe in {runtime}, batch {batch} ...", file=sys.stderr)
        timed = {"fp32": c0 / "model.onnx", **c0_int8}
        plan = SessionPlan(args.threads, False, batch, False, runtime)
        ms = latency(timed, (3, 224, 224), plan, args.runs)
        short = "ort" if runtime == "onnxruntime" else "ov"
        for row in rows:
            row[f"{short}_fp32_ms_b{batch}"] = ms["fp32"]
            row[f"{short}_int8_ms_b{batch}"] = ms[row["recipe"]]
            row[f"{short}_speedup_b{batch}"] = ms["fp32"] / ms[row["recipe"]]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--images", default="64", help="calibration image counts, e.g. 16,64")
    parser.add_argument("--recipes", action="store_true", help="compare the recipes instead")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument(
        "--exports", type=Path, help="keep the exports here, and reuse those already there"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    counts = [int(c) for c in args.images.split(",")]
    results: dict = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        for count in sorted({*counts, 16}):
            photo_crops(work / f"photos{count}", count)
        photo_crops(work / "held_out", HELD_OUT, seed=1)
        if args.recipes:
            results["recipes"] = bench_recipes(work, args)
            columns = [k for k in results["recipes"][0] if k != "recipe"]
            print(render_table(results["recipes"], ("recipe", *columns)))
        else:
            rows = []
            for name in args.variants.split(","):
                rows += bench_variant(name, counts, work, args)
                if args.json:  # after each variant: a long run keeps what it measured
                    args.json.write_text(json.dumps({"variants": rows}, indent=2, default=float))
            results["variants"] = rows
            print(render_table(rows, VARIANT_COLUMNS))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
