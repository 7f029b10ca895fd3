"""Time the element-wise onnxruntime kernels an int8 CoAtNet spends its float time in.

    python scripts/bench_ops.py [--shape 8 56 56 384] [--runs 30]

Each operator runs alone on one tensor (by default the size of a batch-8 coatnet_0 MBConv
activation in S1) at 1 and 2 intra-op threads. It shows which kernels use the second thread:
DequantizeLinear is single-threaded in onnxruntime's CPU provider (onnxruntime#24124).
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from coatnet_export.bench import time_interleaved
from coatnet_export.console import render_table

U8, F32 = TensorProto.UINT8, TensorProto.FLOAT
SCALE = numpy_helper.from_array(np.array(0.05, np.float32), "scale")
ZERO = numpy_helper.from_array(np.array(128, np.uint8), "zero")
OPERATORS = {
    "DequantizeLinear": (
        U8,
        F32,
        [helper.make_node("DequantizeLinear", ["x", "scale", "zero"], ["y"])],
    ),
    "QuantizeLinear": (
        F32,
        U8,
        [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["y"])],
    ),
    "Cast uint8->float": (U8, F32, [helper.make_node("Cast", ["x"], ["y"], to=F32)]),
    "Gelu": (F32, F32, [helper.make_node("Gelu", ["x"], ["y"])]),
    "Add": (F32, F32, [helper.make_node("Add", ["x", "x"], ["y"])]),
}


def session(op: str, shape: list[int], threads: int) -> ort.InferenceSession:
    in_type, out_type, nodes = OPERATORS[op]
    graph = helper.make_graph(
        nodes,
        op,
        [helper.make_tensor_value_info("x", in_type, shape)],
        [helper.make_tensor_value_info("y", out_type, shape)],
        [c for c in (SCALE, ZERO) if c.name in nodes[0].input],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[8, 56, 56, 384])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    inputs = {
        U8: rng.integers(0, 256, args.shape, dtype=np.uint8),
        F32: rng.standard_normal(args.shape, dtype=np.float32),
    }
    rows = []
    for op, (in_type, _, _) in OPERATORS.items():
        sessions = {threads: session(op, args.shape, threads) for threads in (1, 2)}
        feed = {"x": inputs[in_type]}
        runners = {t: functools.partial(s.run, None, feed) for t, s in sessions.items()}
        samples = time_interleaved(runners, 3, args.runs)
        one, two = (float(np.median(samples[t])) * 1000 for t in (1, 2))
        rows.append({"operator": op, "ms_1_thread": one, "ms_2_threads": two, "speedup": one / two})
    print(f"one tensor of shape {args.shape} ({int(np.prod(args.shape)):,} values)")
    print(render_table(rows, ("operator", "ms_1_thread", "ms_2_threads", "speedup")))


if __name__ == "__main__":
    main()
