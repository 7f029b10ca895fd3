"""The graph around onnxruntime's quantizer: preparation, which nodes become int8, compaction.

prepare (quant_pre_process's optimisation and shape inference, file to file; spatial means as
GlobalAveragePool) -> a :class:`Recipe` picks the op types to quantize and the nodes to keep
float -> after quantization, activations that only move into float readers lose their
QuantizeLinear / DequantizeLinear pair (:func:`float_into_float_readers`) and each baked
relative-position bias is stored as its table and an index (:func:`compact_biases`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.quant_utils import add_pre_process_metadata

from coatnet_export.describe import load_proto
from coatnet_export.quantize.recipes import (  # noqa: F401 (the recipes, as before)
    ARITHMETIC,
    DEFAULT_RECIPE,
    OPENVINO_RECIPE,
    POOLS_AND_GATES,
    RECIPES,
    RUNTIME_RECIPES,
    Recipe,
)

SPATIAL_AXES = ([2, 3], [-2, -1])
BIAS_CONSUMERS = ({"Add"}, {"Attention"})
"""What a baked bias feeds: the score Add (matmul attention) or ONNX Attention (fused)."""
MIN_TABLE_RATIO = 4
"""A baked bias is stored as a table when it has at most 1/4 as many distinct vectors as
positions (a relative-position bias has (2h-1)(2w-1) against (hw)^2)."""


def prepare(
    model_path: Path, pre_path: Path, low_memory: bool = False, split_attention: bool = False
) -> int:
    """The preparation of onnxruntime's ``quant_pre_process``, file to file so that no copy of
    the weights is held in Python: onnxruntime's basic graph optimisations (constant folding of
    the weight reshapes and transposes) written to ``pre_path`` with its weights in
    ``pre_path.data``, the spatial means rewritten as pooling (:func:`pool_spatial_means`),
    with ``split_attention`` each fused attention as its products
    (:func:`attention_as_matmuls`), then ONNX shape inference; returns how many means were
    rewritten."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(pre_path)
    options.log_severity_level = 3
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", f"{pre_path.name}.data"
    )
    if low_memory:
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    model = load_proto(pre_path)
    rewritten = pool_spatial_means(model)
    if split_attention:
        attention_as_matmuls(model)
    add_pre_process_metadata(model)
    onnx.save(model, str(pre_path))
    onnx.shape_inference.infer_shapes_path(str(pre_path), str(pre_path))
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


def attention_as_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite each ONNX ``Attention`` node (opset 23; 3-D queries, keys and values with as
    many key/value heads as query heads, an additive float mask or none, an explicit scale,
    not causal, no soft cap, one output) as the products it computes: heads split by Reshape
    and Transpose, MatMul, (Mul by the scale,) Add of the mask, Softmax, MatMul, heads merged.
    Returns how many were rewritten; other Attention nodes are left as they are.

    The same arithmetic (onnxruntime gives bit-identical logits) in the form OpenVINO runs
    fastest: its ONNX reader turns the fused operator into a slower general subgraph.
    """
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    nodes, shapes, rewritten = [], {}, 0
    for node in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if not _plain_attention(node, attributes, types):
            nodes.append(node)
            continue
        heads = attributes["q_num_heads"]
        if heads not in shapes:
            shapes[heads] = f"attention_{heads}_heads_shape"
            graph.initializer.append(
                numpy_helper.from_array(np.array([0, 0, heads, -1], np.int64), shapes[heads])
            )
        nodes += _attention_products(node, shapes[heads], attributes["scale"], graph)
        rewritten += 1
    if rewritten:
        graph.initializer.append(
            numpy_helper.from_array(np.array([0, 0, -1], np.int64), "attention_merge_shape")
        )
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def _plain_attention(node: onnx.NodeProto, attributes: dict, types: dict[str, int]) -> bool:
    """Whether ``node`` is an Attention that :func:`attention_as_matmuls` can rewrite."""
    if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
        return False
    mask = node.input[3] if len(node.input) > 3 else ""
    return (
        len(node.input) <= 4
        and sum(1 for name in node.output if name) == 1
        and "scale" in attributes
        and attributes.get("q_num_heads", 0) > 0
        and attributes.get("q_num_heads") == attributes.get("kv_num_heads")
        and not attributes.get("is_causal", 0)
        and not attributes.get("softcap", 0.0)
        and not attributes.get("qk_matmul_output_mode", 0)
        and (not mask or types.get(mask) == TensorProto.FLOAT)
    )


def _attention_products(
    node: onnx.NodeProto, heads_shape: str, scale: float, graph: onnx.GraphProto
) -> list[onnx.NodeProto]:
    """The nodes of one rewritten Attention (see :func:`attention_as_matmuls`)."""
    prefix = node.name or node.output[0]
    query, key, value = node.input[:3]
    mask = node.input[3] if len(node.input) > 3 else ""

    def step(op: str, inputs: list[str], name: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{prefix}_{name}"], f"{prefix}_{name}", **attrs)

    nodes = [
        step("Reshape", [query, heads_shape], "q_heads"),
        step("Transpose", [f"{prefix}_q_heads"], "q", perm=[0, 2, 1, 3]),
        step("Reshape", [key, heads_shape], "k_heads"),
        step("Transpose", [f"{prefix}_k_heads"], "k_t", perm=[0, 2, 3, 1]),
        step("Reshape", [value, heads_shape], "v_heads"),
        step("Transpose", [f"{prefix}_v_heads"], "v", perm=[0, 2, 1, 3]),
        step("MatMul", [f"{prefix}_q", f"{prefix}_k_t"], "scores"),
    ]
    if scale != 1.0:
        graph.initializer.append(
            numpy_helper.from_array(np.array(scale, np.float32), f"{prefix}_scale")
        )
        nodes.append(step("Mul", [nodes[-1].output[0], f"{prefix}_scale"], "scaled"))
    if mask:
        nodes.append(step("Add", [nodes[-1].output[0], mask], "biased"))
    nodes += [
        step("Softmax", [nodes[-1].output[0]], "weights", axis=-1),
        step("MatMul", [f"{prefix}_weights", f"{prefix}_v"], "heads_out"),
        step("Transpose", [f"{prefix}_heads_out"], "tokens_out", perm=[0, 2, 1, 3]),
    ]
    merge = helper.make_node(
        "Reshape", [f"{prefix}_tokens_out", "attention_merge_shape"], [node.output[0]],
        f"{prefix}_merge",
    )  # fmt: skip
    return [*nodes, merge]


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


FALLBACK_OPS = (*ARITHMETIC, "Mul")
"""Op types the accuracy fallback returns to float (pooling is as exact in int8)."""
DYNAMIC_OPS = ("MatMul", "Gemm")
"""Dynamic quantization leaves Conv float: ConvInteger brought no speed on this machine."""


def nodes_to_float(tensor: str, proto: onnx.ModelProto, excluded: set[str]) -> list[str]:
    """The quantized nodes (not yet ``excluded``) that read ``tensor`` as int8, or else the
    closest one upstream of it: what returns a poorly quantized ``tensor`` to float."""
    readers = [
        n.name
        for n in proto.graph.node
        if tensor in n.input and n.op_type in FALLBACK_OPS and n.name not in excluded
    ]
    if readers:
        return readers
    producer = {out: node for node in proto.graph.node for out in node.output}
    frontier, seen = [tensor], set()
    while frontier:
        node = producer.get(frontier.pop(0))
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in FALLBACK_OPS and node.name not in excluded:
            return [node.name]
        frontier.extend(node.input)
    return []


DATA_MOVEMENT = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


def float_into_float_readers(model: onnx.ModelProto) -> int:
    """Remove each QuantizeLinear -> DequantizeLinear pair on an activation whose values only
    move (Reshape, Transpose, ...) into operators that read float; returns how many.

    Rounding such a tensor to 8 bits buys nothing (its readers dequantize it anyway) and, with
    int8 activations on x86, it does not load: onnxruntime 1.32 moves the pair past the
    Reshape (QDQ propagation, which writes ``output_dtype`` on the QuantizeLinear it adds), then
    turns int8 zero points into uint8 for its x86 kernels but not that attribute
    (timm's stage-transition shortcut convolution -> Reshape -> Transpose -> residual Add).
    The operator before the pair then runs in float."""
    producers = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}

    def moved_into_float(name: str) -> bool:
        if name in outputs:
            return False
        for reader in readers.get(name, []):
            if reader.op_type == "QuantizeLinear":
                return False
            if reader.op_type in DATA_MOVEMENT and not moved_into_float(reader.output[0]):
                return False
        return bool(readers.get(name))

    pairs = []
    for dq in model.graph.node:
        q = producers.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if (
            q is not None
            and q.op_type == "QuantizeLinear"
            and len(readers[q.output[0]]) == 1
            and q.input[0] in producers  # an activation, not a weight
            and all(r.op_type in DATA_MOVEMENT for r in readers.get(dq.output[0], []))
            and moved_into_float(dq.output[0])
        ):
            pairs.append((q, dq))
    parameters = set()
    for q, dq in pairs:
        for reader in readers[dq.output[0]]:
            reader.input[:] = [q.input[0] if i == dq.output[0] else i for i in reader.input]
        parameters |= {*q.input[1:], *dq.input[1:]}
        model.graph.node.remove(q)
        model.graph.node.remove(dq)
    used = {name for node in model.graph.node for name in node.input}
    unused = [t for t in model.graph.initializer if t.name in parameters - used]
    for tensor in unused:  # the pairs' scales and zero points (onnxruntime warns of them)
        model.graph.initializer.remove(tensor)
    return len(pairs)


def compact_biases(model: onnx.ModelProto) -> int:
    """Store each baked relative-position bias (a float constant of shape (1, heads, N, N) that
    only feeds Add nodes, or Attention nodes as their mask) as its small table and one index:
    ``Gather(table, index, axis=2)``, which onnxruntime folds back into the same constant at
    session start. Lossless, and the index is shared by every block with the same token grid;
    returns the bytes saved."""
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    indices: dict[bytes, str] = {}
    kept, gathers, saved = [], [], 0
    for tensor in model.graph.initializer:
        table = _as_table(tensor) if consumers.get(tensor.name) in BIAS_CONSUMERS else None
        if table is None:
            kept.append(tensor)
            continue
        values, index = table
        index_name = indices.setdefault(index.tobytes(), f"{tensor.name}_index")
        if index_name == f"{tensor.name}_index":
            kept.append(numpy_helper.from_array(index, index_name))
            saved -= index.nbytes
        kept.append(numpy_helper.from_array(values, f"{tensor.name}_table"))
        gathers.append(
            helper.make_node(
                "Gather",
                [f"{tensor.name}_table", index_name],
                [tensor.name],
                name=f"{tensor.name}_gather",
                axis=len(tensor.dims) - 2,
            )
        )
        saved += 4 * int(np.prod(tensor.dims)) - values.nbytes
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for node in reversed(gathers):
        model.graph.node.insert(0, node)
    return saved


def _as_table(tensor: onnx.TensorProto) -> tuple[np.ndarray, np.ndarray] | None:
    """A float32 (..., N, N) constant with few distinct vectors over its leading axes, as
    (table (..., K), int32 index (N, N)) in order of first appearance; None if it is not one."""
    dims = list(tensor.dims)
    if (
        tensor.data_type != TensorProto.FLOAT
        or len(dims) < 3
        or dims[-1] != dims[-2]
        or dims[-1] < 4
    ):
        return None
    array = numpy_helper.to_array(tensor)
    positions = array.reshape(-1, dims[-1] * dims[-2]).T  # one row per (i, j)
    unique, first, inverse = np.unique(positions, axis=0, return_index=True, return_inverse=True)
    if len(unique) * MIN_TABLE_RATIO > len(positions):
        return None
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    table = np.ascontiguousarray(unique[order].T.reshape(*dims[:-2], len(unique)))
    index = rank[inverse.reshape(-1)].reshape(dims[-2], dims[-1]).astype(np.int32)
    return table, index
