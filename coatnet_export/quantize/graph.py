"""The graph around onnxruntime's quantizer: preparation, which nodes become int8, compaction.

prepare (quant_pre_process, spatial means as GlobalAveragePool) -> a :class:`Recipe` picks the
op types to quantize and the nodes to keep float -> after quantization, the baked biases are
stored as fp16.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.shape_inference import quant_pre_process

from coatnet_export.console import quiet_libraries
from coatnet_export.inspect import load_proto

SPATIAL_AXES = ([2, 3], [-2, -1])
ARITHMETIC = ("Conv", "MatMul", "Gemm")


def prepare(model_path: Path, pre_path: Path) -> int:
    """onnxruntime's ``quant_pre_process`` of ``model_path`` into ``pre_path``, then the
    spatial means rewritten as pooling (:func:`pool_spatial_means`); returns how many."""
    with quiet_libraries():
        quant_pre_process(str(model_path), str(pre_path), skip_symbolic_shape=True)
    model = load_proto(pre_path)
    rewritten = pool_spatial_means(model)
    if rewritten:
        onnx.save(model, str(pre_path))
    return rewritten


def pool_spatial_means(model: onnx.ModelProto) -> int:
    """Rewrite each ReduceMean over the H, W axes of a 4-D tensor (the squeeze-excitation and
    head means) as GlobalAveragePool (+ Flatten when the axes are dropped); returns how many.

    The result is the same mean, but onnxruntime runs GlobalAveragePool on int8 data
    (QLinearGlobalAveragePool, channels-last) where ReduceMean needs a float copy first.
    """
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*graph.input, *graph.value_info]
        if v.type.HasField("tensor_type")
    }
    nodes, rewritten = [], 0
    for node in graph.node:
        if node.op_type != "ReduceMean" or ranks.get(node.input[0]) != 4:
            nodes.append(node)
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = attributes.get("axes")  # an attribute up to opset 17, an input from 18
        if axes is None and len(node.input) > 1 and node.input[1] in constants:
            axes = numpy_helper.to_array(constants[node.input[1]]).tolist()
        if list(axes or []) not in SPATIAL_AXES:
            nodes.append(node)
            continue
        if attributes.get("keepdims", 1):
            nodes.append(
                helper.make_node(
                    "GlobalAveragePool", [node.input[0]], list(node.output), name=node.name
                )
            )
        else:
            pooled = node.output[0] + "_pooled"
            nodes += [
                helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=node.name),
                helper.make_node(
                    "Flatten", [pooled], list(node.output), name=node.name + "_flat", axis=1
                ),
            ]
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def activation_matmuls(proto: onnx.ModelProto) -> list[str]:
    """MatMul nodes with no constant input: attention's q.k^T and weights.v products."""
    constants = {t.name for t in proto.graph.initializer}
    return [
        n.name
        for n in proto.graph.node
        if n.op_type == "MatMul" and not any(i in constants for i in n.input)
    ]


def non_gate_muls(proto: onnx.ModelProto) -> list[str]:
    """Mul nodes other than squeeze-excitation gates (x * sigmoid(...), through a reshape)."""
    producer = {out: node for node in proto.graph.node for out in node.output}

    def from_sigmoid(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type in ("Unsqueeze", "Reshape", "Flatten"):
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "Sigmoid"

    return [
        n.name
        for n in proto.graph.node
        if n.op_type == "Mul" and not any(from_sigmoid(i) for i in n.input)
    ]


@dataclass(frozen=True)
class Recipe:
    """Which operations static quantization turns into int8."""

    name: str
    op_types: tuple[str, ...] | None
    """Op types to quantize; None is onnxruntime's default (every op it can quantize). "Mul"
    means the squeeze-excitation gates only."""
    float_attention_matmuls: bool = True
    """Keep attention's activation x activation MatMuls (q.k^T, weights.v) in float."""
    float_first_last: bool = False
    """Keep the first convolution (stem) and the last linear layer (head) in float."""

    def exclusions(self, proto: onnx.ModelProto) -> list[str]:
        """Nodes of ``proto`` of a quantized op type that this recipe keeps float."""
        excluded = activation_matmuls(proto) if self.float_attention_matmuls else []
        if self.op_types is not None and "Mul" in self.op_types:
            excluded += non_gate_muls(proto)
        arithmetic = [n.name for n in proto.graph.node if n.op_type in ARITHMETIC]
        if self.float_first_last and arithmetic:
            excluded += list(dict.fromkeys([arithmetic[0], arithmetic[-1]]))
        return excluded


POOLS_AND_GATES = (*ARITHMETIC, "MaxPool", "GlobalAveragePool", "Mul")
DEFAULT_RECIPE = Recipe("arithmetic+pools+gates, float stem+head", POOLS_AND_GATES, True, True)
"""Convolutions, linear layers, the pools and the squeeze-excitation gates in int8, so the
MBConv blocks stay int8 between convolutions except around GELU; the stem convolution and the
head, LayerNormalization, Softmax, GELU, attention's products and the bias and residual Adds
stay float (scripts/bench_quantize.py measures the alternatives: a float stem and head cost no
speed and raise the fixture's smallest cosine similarity)."""
RECIPES = (
    DEFAULT_RECIPE,
    Recipe("arithmetic+pools+gates", POOLS_AND_GATES),
    Recipe("arithmetic", ARITHMETIC),
    Recipe("arithmetic+attention", ARITHMETIC, False),
    Recipe("onnxruntime-default", None),
)
FALLBACK_OPS = (*ARITHMETIC, "Mul")
"""Op types the accuracy fallback returns to float (pooling is as exact in int8)."""


def compact_biases(model_path: Path) -> int:
    """Store large float32 constants that only feed Add nodes (the baked attention biases) as
    fp16 with a Cast, which onnxruntime folds at session start; returns the bytes saved."""
    model = onnx.load(str(model_path))
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    saved = 0
    kept = []
    for tensor in model.graph.initializer:
        dims = list(tensor.dims)
        if (
            tensor.data_type == TensorProto.FLOAT
            and len(dims) >= 3
            and dims[-1] == dims[-2]
            and dims[-1] >= 4
            and consumers.get(tensor.name) == {"Add"}
        ):
            half = numpy_helper.to_array(tensor).astype(np.float16)
            fp16 = numpy_helper.from_array(half, tensor.name + "_fp16")
            kept.append(fp16)
            model.graph.node.insert(
                0,
                helper.make_node(
                    "Cast",
                    [fp16.name],
                    [tensor.name],
                    to=TensorProto.FLOAT,
                    name=tensor.name + "_cast",
                ),
            )
            saved += half.nbytes
            continue
        kept.append(tensor)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(model_path))
    return saved
