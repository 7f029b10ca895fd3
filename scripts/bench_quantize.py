"""Benchmark int8 quantization: speed on coatnet_0, accuracy on the trained digits fixture.

    python scripts/bench_quantize.py [--runs 20] [--json out.json]

1. Wall time of `coatnet-export quantize` on a seeded coatnet_0 with 64 calibration images
   (crops of scikit-learn's sample photographs).
2. For each quantization recipe (which ops become int8): coatnet_0 int8 vs fp32 p50 latency,
   batch 1 and 8, --threads threads, fp32 and every recipe interleaved in one run; and on the
   digits fixture (trained, see scripts/train_fixture.py) top-1 agreement with fp32, accuracy
   of both and the smallest cosine similarity over the 360 held-out images.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from coatnet_export.bench import run_measured
from coatnet_export.console import Progress, quiet_libraries, render_table
from coatnet_export.export.pipeline import ExportOptions, run_export
from coatnet_export.preprocess import Preprocessing
from coatnet_export.quantize.graph import RECIPES, compact_biases, prepare
from coatnet_export.quantize.pipeline import (
    CpuInt8,
    ImageReader,
    QuantOptions,
    agreement,
    choose_types,
    latency,
    load_proto,
    outputs,
    quantize_once,
    read_image_folder,
)
from models import get_variant

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from train_fixture import PREPROCESSING, split, write_images  # noqa: E402


def photo_crops(folder: Path, count: int) -> None:
    """``count`` deterministic random crops of scikit-learn's sample photographs."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    folder.mkdir(parents=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(160, 400))
        top = int(rng.integers(0, photo.shape[0] - side))
        left = int(rng.integers(0, photo.shape[1] - side))
        Image.fromarray(photo[top : top + side, left : left + side]).save(folder / f"{i:03d}.jpg")


def prepared(model: Path, work: Path) -> Path:
    pre = work / f"{model.parent.name}.pre.onnx"
    prepare(model, pre)
    return pre


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {}
    choice = choose_types(CpuInt8.detect())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("exporting coatnet_0 and the digits fixture ...", file=sys.stderr)
        c0 = (
            run_export(
                ExportOptions(
                    architecture=get_variant("coatnet_0"), output=work / "c0", validate=False
                ),
                Progress(4, enabled=False),
            ).directory
            / "model.onnx"
        )
        digits = (
            run_export(
                ExportOptions(
                    architecture=None,
                    output=work / "digits",
                    checkpoint=ROOT / "tests/fixtures/digits/digits.safetensors",
                    mean=(0.5,),
                    std=(0.5,),
                    crop_pct=1.0,
                    validate=False,
                ),
                Progress(4, enabled=False),
            ).directory
            / "model.onnx"
        )
        photo_crops(work / "photos", 64)
        train, test = split()
        write_images(work / "digits_calibration", train[:64])
        write_images(work / "digits_test", test)

        print("timing `coatnet-export quantize` on coatnet_0 with 64 images ...", file=sys.stderr)
        run = run_measured(
            [
                sys.executable,
                "-m",
                "coatnet_export",
                "quantize",
                str(c0.parent),
                "--calibration-data",
                str(work / "photos"),
                "--calibration-samples",
                "64",
                "--threads",
                str(args.threads),
            ]
        )
        if run.returncode not in (0, 1):
            print(run.output[-3000:], file=sys.stderr)
            sys.exit(1)
        report = json.loads((c0.parent / "quantization.json").read_text())
        results["quantize_coatnet_0"] = {
            "wall_s": run.wall_s,
            "peak_rss_gib": run.peak_rss_bytes / 2**30,
            "fp32_mib": report["sizes"]["fp32"] / 2**20,
            "int8_mib": report["sizes"]["int8"] / 2**20,
            "int8_share": report["sizes"]["int8"] / report["sizes"]["fp32"],
            "speedup_batch1": report["speedup"],
            "choice": report["choice"],
        }
        print(
            render_table(
                [results["quantize_coatnet_0"]],
                ("wall_s", "peak_rss_gib", "fp32_mib", "int8_mib", "int8_share", "speedup_batch1"),
            )
        )

        c0_pre, digits_pre = prepared(c0, work), prepared(digits, work)
        photos, _, _ = read_image_folder(work / "photos", Preprocessing((224, 224)), None, 64)
        labels = [str(d) for d in range(10)]
        calibration, _, _ = read_image_folder(work / "digits_calibration", PREPROCESSING, labels)
        held_out, targets, _ = read_image_folder(work / "digits_test", PREPROCESSING, labels)
        reference = outputs(digits_pre, held_out, args.threads)
        options = QuantOptions()
        rows, c0_int8 = [], {}
        for index, recipe in enumerate(RECIPES):
            print(f"recipe {recipe.name} ...", file=sys.stderr)
            row: dict = {"recipe": recipe.name}
            c0_int8[recipe.name] = work / f"c0.recipe{index}.onnx"
            digits_int8 = work / f"digits.recipe{index}.onnx"
            for pre, out, reader in (
                (c0_pre, c0_int8[recipe.name], ImageReader("input", photos[:16])),
                (digits_pre, digits_int8, ImageReader("input", calibration)),
            ):
                with quiet_libraries():
                    exclude = recipe.exclusions(load_proto(pre))
                    quantize_once(pre, out, options, choice, reader, exclude, recipe)
                compact_biases(out)
            agree = agreement(reference, outputs(digits_int8, held_out, args.threads), targets)
            row.update(
                top1_agreement=agree.top1,
                fp32_accuracy=agree.fp32_accuracy,
                int8_accuracy=agree.int8_accuracy,
                min_cosine=agree.min_cosine,
            )
            rows.append(row)
        for batch in (1, 8):
            print(f"timing fp32 and every recipe, batch {batch} ...", file=sys.stderr)
            ms = latency({"fp32": c0, **c0_int8}, (3, 224, 224), args.threads, args.runs, batch)
            for row in rows:
                row[f"fp32_ms_b{batch}"] = ms["fp32"]
                row[f"int8_ms_b{batch}"] = ms[row["recipe"]]
                row[f"speedup_b{batch}"] = ms["fp32"] / ms[row["recipe"]]
        results["recipes"] = rows
        print(
            render_table(
                rows,
                (
                    "recipe",
                    "fp32_ms_b1",
                    "int8_ms_b1",
                    "speedup_b1",
                    "fp32_ms_b8",
                    "int8_ms_b8",
                    "speedup_b8",
                    "top1_agreement",
                    "fp32_accuracy",
                    "int8_accuracy",
                    "min_cosine",
                ),
            )
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
