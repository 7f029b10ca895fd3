#!/usr/bin/env python3
"""Time the e2e preprocessing graph against Pillow (infer.py's preprocessing) on random images.

    PYTHONPATH=. python scripts/bench_preprocessing.py [--threads 2] [--runs 5] [--compare F]

Each row: one image size resized for one input, the graph (coatnet_export.targets.e2e, alone,
in onnxruntime) and Pillow timed in interleaved rounds after a warm-up; medians in ms.
``--compare`` times another version's e2e.py in the same rounds (e.g. the ONNX Resize graph:
``git show 8e00e93:coatnet_export/targets/e2e.py > /tmp/resize_e2e.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from coatnet_export.preprocess import Preprocessing
from coatnet_export.targets.e2e import preprocessing_model

CASES = (  # (height, width) of the image, input side, crop mode
    ((480, 640), 224, "center"),
    ((960, 1280), 224, "center"),
    ((3000, 4000), 384, "squash"),
)


def median_ms(runs: list[float]) -> float:
    return statistics.median(runs) * 1e3


def load_module(path: Path):
    """Another version of e2e.py, as a module."""
    spec = importlib.util.spec_from_file_location("compared_e2e", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def bench(threads: int, runs: int, compare: Path | None) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    rng = np.random.default_rng(0)
    builders = {"graph": preprocessing_model}
    if compare is not None:
        builders["compared"] = load_module(compare).preprocessing_model
    print("image -> input | Pillow ms | " + " | ".join(f"{name} ms" for name in builders))
    for (height, width), side, mode in CASES:
        crop = 1.0 if mode == "squash" else 0.95
        pre = Preprocessing((side, side), (0.5,) * 3, (0.5,) * 3, crop, "bicubic", mode)
        sessions = {
            name: ort.InferenceSession(
                build(pre).SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            for name, build in builders.items()
        }
        pixels = rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels[0])
        timings: dict[str, list[float]] = {name: [] for name in ("pillow", *sessions)}
        for round_ in range(runs + 1):  # round 0 warms up
            start = time.perf_counter()
            pre(image)
            took = {"pillow": time.perf_counter() - start}
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"image": pixels})
                took[name] = time.perf_counter() - start
            if round_:
                for name, seconds in took.items():
                    timings[name].append(seconds)
        medians = " | ".join(f"{median_ms(timings[name]):.0f}" for name in timings)
        print(f"{width}x{height} -> {side} {mode} | {medians}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compare", type=Path, help="another version's e2e.py to time too")
    args = parser.parse_args()
    bench(args.threads, args.runs, args.compare)


if __name__ == "__main__":
    main()
