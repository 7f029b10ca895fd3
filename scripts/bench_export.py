"""Benchmark the export: latency against a plain export and eager PyTorch, export time, memory.

    python scripts/bench_export.py                      # latency + coatnet_1 export time
    python scripts/bench_export.py --skip-latency --variants coatnet_3,coatnet_4
                                                        # peak RSS of the mid-size exports
    python scripts/bench_export.py --skip-latency --repeat 3 --steps
                                                        # coatnet_1 export time, step by step
    python scripts/bench_export.py --skip-latency --variants all

Latency: coatnet_0 (seeded), batch 1, --threads threads, measured interleaved in one run:
our export with fused attention (ONNX Attention) and with matmul attention, a plain default
`torch.onnx.export` of the same unmodified model, and PyTorch eager; with the model's
achieved GFLOP/s and a 2048^2 fp32 matmul's as the machine's peak.

Export runs: `coatnet-export --variant NAME` in a child process (--export-args adds options),
its wall time, its peak RSS against the weights and the memory target (1.5 x weights + 1 GiB),
and with --steps the time of each step as the command's progress lines print it. With
--repeat N each variant is exported N times; the table shows the median wall time and the
largest peak.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from coatnet_export.bench import (
    MATMUL,
    matmul_runner,
    run_measured,
    summarize,
    time_interleaved,
)
from coatnet_export.console import Progress, render_table
from coatnet_export.export.onnx_export import AttentionGraph
from coatnet_export.export.pipeline import ExportOptions, run_export
from coatnet_export.runtimes.onnxruntime import make_session
from models import (
    build_variant,
    get_variant,
    init_weights,
    materialize,
    variant_cost,
    variant_names,
)

STEP_LINE = re.compile(r"^\[(\d+)/\d+\] (.+?) \.\.\. ([\d.]+) s$", re.MULTILINE)
"""A progress line of the export command: ``[4/6] exporting ... 6.2 s``."""
MEMORY_TARGET = (1.5, 1.0)
"""Peak RSS target of an export: 1.5 x the weights + 1 GiB."""


def seeded(name: str) -> torch.nn.Module:
    return init_weights(materialize(build_variant(name, device="meta")), 0).eval()


def export_ours(workdir: Path, attention: AttentionGraph) -> Path:
    outcome = run_export(
        ExportOptions(
            architecture=get_variant("coatnet_0"),
            output=workdir / f"ours-{attention}",
            samples=1,
            attention=attention,
        ),
        Progress(enabled=False),
    )
    return outcome.directory / "model.onnx"


def latency(workdir: Path, threads: int, runs: int) -> tuple[list[dict], dict]:
    torch.set_num_threads(threads)
    ours = {attention: export_ours(workdir, attention) for attention in ("fused", "matmul")}
    plain_path = workdir / "plain" / "model.onnx"
    plain_path.parent.mkdir()
    model = seeded("coatnet_0")
    x = torch.randn(1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(plain_path))  # the plain default call
    macs = variant_cost(get_variant("coatnet_0")).macs
    feed = x.numpy()
    sessions = {
        f"onnx (coatnet-export, {attention} attention)": make_session(path, threads)
        for attention, path in ours.items()
    }
    sessions["onnx (plain torch.onnx.export)"] = make_session(plain_path, threads)
    candidates: dict[str, Callable[[], object]] = {
        name: functools.partial(s.run, None, {s.get_inputs()[0].name: feed})
        for name, s in sessions.items()
    }

    def eager() -> None:
        with torch.no_grad():
            model(x)

    candidates["pytorch eager"] = eager
    matmul, matmul_flops = matmul_runner(threads)
    samples = time_interleaved({**candidates, MATMUL: matmul}, warmup=5, runs=runs)
    peak = matmul_flops / float(np.median(samples.pop(MATMUL))) / 1e9
    rows = [
        summarize(name, s, 1, threads, macs, peak_gflops=peak).as_dict()
        for name, s in samples.items()
    ]
    base = {r["name"]: r["p50_ms"] for r in rows}
    for row in rows:
        row["vs_eager"] = row["p50_ms"] / base["pytorch eager"]
        row["vs_plain"] = row["p50_ms"] / base["onnx (plain torch.onnx.export)"]
    return rows, {"matmul_2048_gflops": peak, "model_gflops": 2 * macs / 1e9}


def export_once(name: str, out: Path, extra: list[str]) -> tuple[float, int, int, dict, str]:
    """One export in a child process: wall s, peak RSS bytes, exit code, step times, output."""
    argv = [sys.executable, "-m", "coatnet_export", "--variant", name, "--output", str(out)]
    run = run_measured([*argv, "--force", *extra])
    steps = {f"{int(k)}. {label}": float(s) for k, label, s in STEP_LINE.findall(run.output)}
    for path in sorted(out.glob("*")) if out.exists() else []:
        path.unlink()
    return run.wall_s, run.peak_rss_bytes, run.returncode, steps, run.output


def export_runs(names: list[str], workdir: Path, repeat: int, extra: list[str]) -> list[dict]:
    rows = []
    for name in names:
        walls, peaks, codes, all_steps = [], [], [], []
        for _ in range(repeat):
            wall, peak, code, steps, output = export_once(name, workdir / f"run-{name}", extra)
            walls.append(wall)
            peaks.append(peak)
            codes.append(code)
            all_steps.append(steps)
            if code:
                print(output[-2000:], file=sys.stderr)
        weight_bytes = variant_cost(get_variant(name)).parameters * 4
        target = MEMORY_TARGET[0] * weight_bytes + MEMORY_TARGET[1] * 2**30
        rows.append(
            {
                "variant": name,
                "wall_s": statistics.median(walls),
                "walls_s": walls,
                "peak_rss_gib": max(peaks) / 2**30,
                "weights_gib": weight_bytes / 2**30,
                "rss_over_weights": max(peaks) / weight_bytes,
                "target_gib": target / 2**30,
                "within_target": "yes" if max(peaks) <= target else "NO",
                "exit": max(codes),
                "steps_s": {
                    step: statistics.median(s[step] for s in all_steps if step in s)
                    for step in all_steps[0]
                },
            }
        )
    return rows


def print_steps(rows: list[dict]) -> None:
    """Median time of each progress step, one table per variant."""
    for row in rows:
        steps = [{"step": step, "median_s": s} for step, s in row["steps_s"].items()]
        steps.append({"step": "whole command (wall)", "median_s": row["wall_s"]})
        print(f"\n{row['variant']}: median of {len(row['walls_s'])} run(s)")
        print(render_table(steps, ("step", "median_s")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument(
        "--variants",
        default="coatnet_1",
        help="comma-separated variants to export end to end, 'all', or 'none'",
    )
    parser.add_argument("--repeat", type=int, default=1, help="exports per variant")
    parser.add_argument("--steps", action="store_true", help="print each step's time")
    parser.add_argument(
        "--export-args",
        default="",
        help="extra options for the export command, e.g. '--attention matmul'",
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args()
    names = {"all": variant_names(), "none": []}.get(args.variants, args.variants.split(","))
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
            columns = ("name", "p50_ms", "p90_ms", "gflops_per_s", "pct_of_peak", "vs_eager")
            print(render_table(rows, (*columns, "vs_plain")))
            print(
                f"2048^2 fp32 matmul: {machine['matmul_2048_gflops']:.0f} GFLOP/s; "
                f"coatnet_0: {machine['model_gflops']:.2f} GFLOP per image\n"
            )
        if names:
            print(
                f"export + validation wall time and peak RSS: {', '.join(names)} "
                f"({args.repeat} run(s) each) ...",
                file=sys.stderr,
            )
            extra = shlex.split(args.export_args)
            results["exports"] = export_runs(names, Path(tmp), args.repeat, extra)
            print(
                render_table(
                    results["exports"],
                    (
                        "variant",
                        "wall_s",
                        "peak_rss_gib",
                        "weights_gib",
                        "rss_over_weights",
                        "target_gib",
                        "within_target",
                        "exit",
                    ),
                )
            )
            if args.steps:
                print_steps(results["exports"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    if any(r["exit"] for r in results.get("exports", [])):
        sys.exit(1)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
