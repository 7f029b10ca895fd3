"""Every full-size timm CoAtNet-family architecture against timm's own forward, one at a time.

    python scripts/timm_parity.py --timm-python /work/timmenv/bin/python --work /tmp/parity \\
        [--json parity.json] [ARCH ...]

For each architecture: timm_vectors.py (run with ``--timm-python``, where timm is installed)
builds it with timm's initialisation and writes a hub folder with timm's logits for two random
images; ``coatnet-export --checkpoint <folder> --reference-outputs io.npz`` then exports it
(architecture and preprocessing from config.json) and validates the ONNX model against those
logits in onnxruntime. The row records the parameters, the recorded case's max |error| relative
to max |logit|, whether top-1 agrees, the export's wall time and peak memory (its process
tree's: the export runs PyTorch in a child) and the bound the issue sets (1.5 x the fp32
weights + 1 GiB). Folders are deleted after each architecture, so one full-size model is on
disk at a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from coatnet_export.bench import run_measured
from coatnet_export.console import render_table
from coatnet_export.metadata import write_json
from models import TIMM_VARIANTS, variant_cost

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = (
    "arch",
    "parameters",
    "max_rel",
    "top1_same",
    "export_s",
    "peak_gib",
    "bound_gib",
    "file_ratio",
)


def run_arch(arch: str, timm_python: str, work: Path) -> dict:
    folder, out = work / arch, work / f"{arch}.onnx"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [
            timm_python,
            str(ROOT / "scripts" / "timm_vectors.py"),
            "full",
            arch,
            "--out",
            str(folder),
        ],
        check=True,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    command = [sys.executable, "-m", "coatnet_export"]
    command += ["--checkpoint", str(folder), "--output", str(out), "--samples", "1"]
    command += ["--reference-outputs", str(folder / "io.npz"), "--quiet"]
    run = run_measured(command, env=env)
    if run.returncode != 0:
        raise SystemExit(f"{arch}: export failed\n{run.output[-3000:]}")
    report = json.loads((out / "validation.json").read_text())
    recorded = next(r for r in report["results"] if r["case"].startswith("recorded"))
    parameters = variant_cost(TIMM_VARIANTS[arch], TIMM_VARIANTS[arch].img_size).parameters
    weights = parameters * 4
    files = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    shutil.rmtree(folder)
    shutil.rmtree(out)
    return {
        "arch": arch,
        "parameters": parameters,
        "max_rel": recorded["max_rel"],
        "top1_same": recorded["top1"] == 1.0,
        "export_s": round(run.wall_s, 1),
        "peak_gib": round(run.peak_rss_bytes / 2**30, 2),
        "bound_gib": round((1.5 * weights + 2**30) / 2**30, 2),
        "file_ratio": round(files / weights, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("archs", nargs="*", help="architectures [all]")
    parser.add_argument("--timm-python", required=True, help="a python with timm installed")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder")
    parser.add_argument("--json", type=Path, help="append each row here as it is measured")
    args = parser.parse_args()
    rows = []
    for arch in args.archs or TIMM_VARIANTS:
        rows.append(run_arch(arch, args.timm_python, args.work))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            write_json(args.json, rows)
    shown = [
        {**r, "max_rel": f"{r['max_rel']:.1e}", "parameters": f"{r['parameters']:,}"} for r in rows
    ]
    print(render_table(shown, COLUMNS))


if __name__ == "__main__":
    main()
