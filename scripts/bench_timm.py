"""Our ONNX export of a timm CoAtNet against timm's own ONNX export, in onnxruntime.

    # in the timm environment: the weights as a hub folder, timm's logits and timm's ONNX
    PYTHONPATH=$PWD /work/timmenv/bin/python scripts/timm_vectors.py full coatnet_0_rw_224 \\
        --out /tmp/timm/coatnet_0_rw_224 --onnx
    # here: export ours from that folder, quantize it, time the three side by side
    python scripts/bench_timm.py /tmp/timm/coatnet_0_rw_224 --json bench.json

For each folder (config.json + model.safetensors + timm.onnx, as timm_vectors.py writes it),
the weights are exported with coatnet-export into ``<folder>-ours`` (fp32, validated against
timm's logits in io.npz) and quantized (static, random calibration: the weights are timm's
random initialisation, so there are no images to calibrate on), then timm's own ONNX
(torch.onnx.export of the timm model, as timm's onnx_export.py does), our fp32 and our int8
model are timed interleaved (coatnet_export.bench, as ``coatnet-export bench`` does) at every
batch size and thread count. The speed-up is over timm's export at the same batch and threads.
Run it on a quiet machine: other processes on the cores skew every figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from coatnet_export.bench import BenchOptions, BenchPlan, BenchTarget, benchmark, model_target
from coatnet_export.console import Progress, render_table
from coatnet_export.export.pipeline import ExportOptions, run_export
from coatnet_export.metadata import write_json
from models import TIMM_VARIANTS, variant_cost

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtimes import cpu_model

COLUMNS = (
    "arch",
    "name",
    "threads",
    "batch",
    "p50_ms",
    "p90_ms",
    "images_per_s",
    "pct_of_peak",
    "speedup",
)
"""pct_of_peak: the model's GFLOP/s as a share of a 2048² fp32 MatMul's in the same rounds."""
BASELINE = "timm onnx fp32"


def prepare(folder: Path) -> dict[str, Path]:
    """Our fp32 and int8 exports of the folder's weights (made once), and timm's ONNX."""
    ours = folder.with_name(f"{folder.name}-ours")  # beside it: an output never lies in an input
    if not (ours / "model.onnx").is_file():
        run_export(
            ExportOptions(
                architecture=None,
                checkpoint=folder,
                output=ours,
                reference_outputs=folder / "io.npz",
                samples=1,
            ),
            Progress(),
        )
    if not (ours / "model.int8.onnx").is_file():
        command = [sys.executable, "-m", "coatnet_export", "quantize", str(ours)]
        command += ["--random-calibration", "--calibration-samples", "16"]
        subprocess.run(command, check=True)
    return {
        BASELINE: folder / "timm.onnx",
        "ours fp32": ours / "model.onnx",
        "ours int8": ours / "model.int8.onnx",
    }


def bench_folder(folder: Path, args: argparse.Namespace) -> list[dict]:
    arch = json.loads((folder / "config.json").read_text())["architecture"]
    paths = prepare(folder)
    targets: list[BenchTarget] = [model_target(name, path) for name, path in paths.items()]
    size = json.loads((folder / "config.json").read_text())["pretrained_cfg"]["input_size"]
    shape = (int(size[0]), int(size[1]), int(size[2]))
    macs = variant_cost(TIMM_VARIANTS[arch], shape[1:]).macs  # the same work for all three
    plan = BenchPlan(targets, {n: str(p) for n, p in paths.items()}, shape, macs)
    options = BenchOptions(
        batches=tuple(args.batch), threads=tuple(args.threads), runs=args.runs, warmup=args.warmup
    )
    rows, _ = benchmark(plan, options, Progress())
    base = {(r.threads, r.batch): r.p50_ms for r in rows if r.name == BASELINE}
    return [
        {"arch": arch, **r.as_dict(), "speedup": base[r.threads, r.batch] / r.p50_ms} for r in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders from timm_vectors.py full")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes [1, 8]")
    parser.add_argument("--threads", type=int, action="append", help="thread counts [2]")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows and the CPU here")
    args = parser.parse_args()
    args.batch, args.threads = args.batch or [1, 8], args.threads or [2]
    rows = [row for folder in args.folders for row in bench_folder(folder, args)]
    shown = [
        {
            **r,
            **{k: f"{r[k]:.2f}" for k in ("p50_ms", "p90_ms", "images_per_s", "speedup")},
            "pct_of_peak": f"{r['pct_of_peak']:.0f}" if r["pct_of_peak"] is not None else "",
        }
        for r in rows
    ]
    print(f"\nCPU: {cpu_model()}")
    print(render_table(shown, COLUMNS))
    if args.json:
        write_json(args.json, {"cpu": cpu_model(), "rows": rows})


if __name__ == "__main__":
    main()
