"""Benchmark the export: latency against a plain export and eager PyTorch, export time, memory.

    python scripts/bench_export.py                      # latency + coatnet_1 export time
    python scripts/bench_export.py --variants all       # + peak RSS / wall time of every variant

Latency: coatnet_0 (seeded), batch 1, --threads threads, measured interleaved in one run:
our export, a plain default `torch.onnx.export` of the same unmodified model, and PyTorch
eager; with the model's achieved GFLOP/s and a 2048^2 fp32 matmul's as the machine's peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from coatnet_export.bench import (
    matmul_peak_gflops,
    run_measured,
    summarize,
    time_interleaved,
)
from coatnet_export.console import Progress, render_table
from coatnet_export.export.pipeline import ExportOptions, run_export
from coatnet_export.runtimes.onnxruntime import make_session
from models import build_variant, count_macs, get_variant, init_weights, materialize, variant_names


def seeded(name: str) -> torch.nn.Module:
    return init_weights(materialize(build_variant(name, device="meta")), 0).eval()


def latency(workdir: Path, threads: int, runs: int) -> tuple[list[dict], dict]:
    torch.set_num_threads(threads)
    ours = run_export(
        ExportOptions(architecture=get_variant("coatnet_0"), output=workdir / "ours", samples=1),
        Progress(6, enabled=False),
    )
    plain_path = workdir / "plain" / "model.onnx"
    plain_path.parent.mkdir()
    model = seeded("coatnet_0")
    x = torch.randn(1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(plain_path))  # the plain default call
    macs = count_macs(build_variant("coatnet_0", device="meta"))
    feed = x.numpy()
    sessions = {
        "onnx (coatnet-export)": make_session(
            ours.directory / "model.onnx", threads, spinning=False
        ),
        "onnx (plain torch.onnx.export)": make_session(plain_path, threads, spinning=False),
    }
    candidates = {
        name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed}))
        for name, s in sessions.items()
    }

    def eager() -> None:
        with torch.no_grad():
            model(x)

    candidates["pytorch eager"] = eager
    samples = time_interleaved(candidates, warmup=5, runs=runs)
    rows = [summarize(name, s, 1, threads, macs).as_dict() for name, s in samples.items()]
    base = {r["name"]: r["p50_ms"] for r in rows}
    for row in rows:
        row["vs_eager"] = row["p50_ms"] / base["pytorch eager"]
        row["vs_plain"] = row["p50_ms"] / base["onnx (plain torch.onnx.export)"]
    peak = matmul_peak_gflops(threads)
    for row in rows:
        row["pct_of_peak"] = 100 * row["gflops_per_s"] / peak
    return rows, {
        "matmul_2048_gflops": peak,
        "model_gflops": 2 * macs / 1e9,
        "ours_nodes": ours.graph.nodes,
    }


def export_runs(names: list[str], workdir: Path) -> list[dict]:
    rows = []
    for name in names:
        out = workdir / f"run-{name}"
        argv = [
            sys.executable,
            "-m",
            "coatnet_export",
            "--variant",
            name,
            "--output",
            str(out),
            "--quiet",
        ]
        run = run_measured(argv)
        model = build_variant(name, device="meta")
        weight_bytes = sum(p.numel() * 4 for p in model.parameters())
        rows.append(
            {
                "variant": name,
                "wall_s": run.wall_s,
                "peak_rss_gib": run.peak_rss_bytes / 2**30,
                "weights_gib": weight_bytes / 2**30,
                "rss_over_weights": run.peak_rss_bytes / weight_bytes,
                "exit": run.returncode,
            }
        )
        if run.returncode:
            print(run.output[-2000:], file=sys.stderr)
        for path in sorted(out.glob("*")) if out.exists() else []:
            path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument(
        "--variants",
        default="coatnet_1",
        help="comma-separated variants to export end to end, or 'all'",
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args()
    names = variant_names() if args.variants == "all" else args.variants.split(",")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_latency:
            print(
                f"latency: coatnet_0, batch 1, {args.threads} threads, {args.runs} interleaved "
                "runs each ...",
                file=sys.stderr,
            )
            rows, machine = latency(Path(tmp), args.threads, args.runs)
            results["latency"], results["machine"] = rows, machine
            print(
                render_table(
                    rows,
                    (
                        "name",
                        "p50_ms",
                        "p90_ms",
                        "gflops_per_s",
                        "pct_of_peak",
                        "vs_eager",
                        "vs_plain",
                    ),
                )
            )
            print(
                f"2048^2 fp32 matmul: {machine['matmul_2048_gflops']:.0f} GFLOP/s; "
                f"coatnet_0: {machine['model_gflops']:.2f} GFLOP per image\n"
            )
        print(
            f"export + validation wall time and peak RSS: {', '.join(names)} ...", file=sys.stderr
        )
        results["exports"] = export_runs(names, Path(tmp))
        print(
            render_table(
                results["exports"],
                ("variant", "wall_s", "peak_rss_gib", "weights_gib", "rss_over_weights", "exit"),
            )
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    if any(r["exit"] for r in results["exports"]):
        sys.exit(1)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
