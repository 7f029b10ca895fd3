"""Every runtime side by side: onnxruntime and OpenVINO, fp32 and int8, and PyTorch eager.

    python scripts/bench_runtimes.py                    # a seeded coatnet_0, exported here
    python scripts/bench_runtimes.py coatnet_0/ c0-ov/model.int8.onnx --threads 1 --threads 2

Needs the openvino extra (``pip install -c constraints.txt -e '.[openvino]'``) and, without
models, scikit-learn (the test extra) for the calibration photographs.

Without models, the variant (``--variant``, default coatnet_0) is exported with seeded weights
into a temporary folder and quantized twice on crops of scikit-learn's sample photographs:
once for onnxruntime (``model.int8.onnx``) and once with ``--runtime openvino`` (an int8 graph
laid out for OpenVINO, "onnx int8 for openvino"). Models given are export folders (their
model.onnx and model.int8.onnx) or ONNX files. Every target (each ONNX model in both runtimes,
and PyTorch eager) and a 2048² fp32 matmul are timed at every batch size and thread count,
interleaved round-robin (coatnet_export.bench, as ``coatnet-export bench`` does); the matmul's
rate in the same rounds is the peak each row is a share of. The table gives p50/p90 latency,
images/s, GFLOP/s, the share of the matmul rate and the speed-up over onnxruntime fp32 at the
same batch and threads; the CPU model is printed with it and recorded in the JSON. Run it on
a quiet machine: other processes on the cores skew every figure.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from coatnet_export.bench import BenchOptions, LatencyStats, describe_peaks, run_bench
from coatnet_export.console import Progress, render_table
from coatnet_export.errors import InputError
from coatnet_export.metadata import write_json
from coatnet_export.runtimes import check_runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_quantize's photo_crops
RUNTIMES = ("onnxruntime", "openvino")
BASELINE = ("onnx fp32", "onnxruntime")
"""The (name, runtime) every speed-up is measured against."""
COLUMNS = (
    "name",
    "runtime",
    "threads",
    "batch",
    "p50_ms",
    "p90_ms",
    "images_per_s",
    "gflops_per_s",
    "pct_of_peak",
    "speedup",
)


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo, else lscpu, else the platform module."""
    from coatnet_export.quantize import read_cpu

    model = read_cpu()["model"]
    if model and model != platform.machine().lower():
        return model
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return model
    names = [line.split(":", 1)[1].strip() for line in lines.splitlines() if "Model name" in line]
    return names[0] if names else model


def versions() -> dict[str, str]:
    import onnxruntime
    import openvino
    import torch

    return {
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.get_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def export_and_quantize(variant: str, work: Path, calibration: int) -> list[Path]:
    """A seeded export of ``variant`` in ``work``, quantized on photograph crops for each
    runtime; returns the export folder (fp32 and onnxruntime int8) and the OpenVINO int8 file."""
    from bench_quantize import photo_crops

    from coatnet_export.export.pipeline import ExportOptions, run_export
    from coatnet_export.quantize import QuantOptions, run_quantize
    from models import get_variant

    say(f"exporting {variant} (seeded weights) ...")
    outcome = run_export(
        ExportOptions(architecture=get_variant(variant), output=work / variant, samples=1),
        Progress(enabled=False),
    )
    photo_crops(work / "photos", calibration)
    for_openvino = work / f"{variant}-openvino"
    for_openvino.mkdir()
    (for_openvino / "model.onnx").hardlink_to(outcome.directory / "model.onnx")
    outputs = []
    for folder, runtime in ((outcome.directory, "onnxruntime"), (for_openvino, "openvino")):
        say(f"quantizing for {runtime} on {calibration} photograph crops ...")
        quantized = run_quantize(
            QuantOptions(
                model=folder,
                calibration_data=work / "photos",
                samples=calibration,
                latency_runs=5,
                runtime=runtime,
            ),
            Progress(),
        )
        if not quantized.passed:
            say(f"warning: int8 for {runtime} failed its gate ({quantized.report.gate})")
        outputs.append(quantized.model)
    return [outcome.directory, outputs[1]]


def table_rows(rows: list[LatencyStats]) -> list[dict]:
    """Each result with its speed-up over the baseline."""
    table = [r.as_dict() for r in rows]
    baseline = {
        (r["threads"], r["batch"]): r["p50_ms"]
        for r in table
        if (r["name"], r["runtime"]) == BASELINE
    }
    for row in table:
        row["speedup"] = baseline[row["threads"], row["batch"]] / row["p50_ms"]
    return table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", type=Path, nargs="*", help="export folders or ONNX files [default: export]"
    )
    parser.add_argument("--variant", default="coatnet_0", help="without EXPORT: what to export")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--batch", type=int, action="append", help="[default: 1 and 8]")
    parser.add_argument("--threads", type=int, action="append", help="[default: 2]")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch eager out")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def say(text: str) -> None:
    print(text, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    for runtime in RUNTIMES:
        check_runtime(runtime)
    batches, threads = args.batch or [1, 8], args.threads or [2]
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp:
        work = Path(tmp)
        models = args.models or export_and_quantize(args.variant, work, args.calibration_images)
        options = BenchOptions(
            models=tuple(models),
            batches=tuple(batches),
            threads=tuple(threads),
            runs=args.runs,
            warmup=args.warmup,
            with_torch=not args.no_torch,
            runtimes=RUNTIMES,
        )
        outcome = run_bench(options, Progress())
    table = table_rows(outcome.results)
    cpu = cpu_model()
    print(render_table(table, COLUMNS))
    print(
        f"CPU: {cpu}; model: {outcome.gflop_per_image:.2f} GFLOP per image; "
        + describe_peaks(outcome.peaks)
    )
    if args.json:
        write_json(
            args.json,
            {
                "command": " ".join(sys.argv),
                "cpu": cpu,
                "versions": versions(),
                **outcome.as_dict(),
                "results": table,
            },
        )
    return 0


def main() -> int:
    try:
        return run(parse_args())
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
