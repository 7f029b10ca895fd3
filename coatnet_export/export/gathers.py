"""Table lookups that onnxruntime folds into one constant each, not two.

The exporters write a baked bias as ``Gather(table, Reshape(index, [-1]), axis)`` followed by a
``Reshape`` to (1, heads, N, N): ``index_select`` takes a flat index. onnxruntime folds both
nodes at session start and keeps both results, so every session held each bias twice (0.23 GiB
more for coatnet_rmlp_2_rw_384). Gathering with the index in its final shape gives the same
values from one node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass(frozen=True)
class ShapedLookup:
    """A constant Gather whose only reader is a Reshape that splits the gathered axis."""

    gather: onnx.NodeProto
    reshape: onnx.NodeProto
    index_root: str
    """The index initializer, before any Reshape of it."""
    index_shape: tuple[int, ...]


def gather_in_final_shape(model: onnx.ModelProto) -> int:
    """Rewrite ``Reshape(Gather(table, flat index))`` as ``Gather(table, shaped index)`` wherever
    every lookup through that index agrees on the shape; returns the lookups rewritten."""
    graph = model.graph
    lookups = [found for node in graph.node if (found := _shaped_lookup(graph, node))]
    by_root: dict[str, list[ShapedLookup]] = {}
    for lookup in lookups:
        by_root.setdefault(lookup.index_root, []).append(lookup)
    rewritten, removed = 0, []
    for root, group in by_root.items():
        if not _index_only_feeds(graph, root, group):
            continue
        index = _initializer(graph, root)
        assert index is not None  # _shaped_lookup found it
        index.dims[:] = group[0].index_shape  # the same bytes, row-major
        chains = [
            n
            for n in graph.node
            if n.op_type == "Reshape" and _index_root(graph, n.output[0]) == root
        ]
        for lookup in group:
            lookup.gather.input[1] = root
            lookup.gather.output[0] = lookup.reshape.output[0]
        removed += [lookup.reshape for lookup in group] + chains
        rewritten += len(group)
    _remove(graph, removed)
    return rewritten


def _shaped_lookup(graph: onnx.GraphProto, gather: onnx.NodeProto) -> ShapedLookup | None:
    if gather.op_type != "Gather":
        return None
    table = _initializer(graph, gather.input[0])
    readers = [n for n in graph.node if gather.output[0] in n.input]
    if (
        table is None
        or len(readers) != 1
        or readers[0].op_type != "Reshape"
        or gather.output[0] in _outputs(graph)
    ):
        return None
    reshape = readers[0]
    target = _constant(graph, reshape.input[1])
    root = _index_root(graph, gather.input[1])
    index = _initializer(graph, root) if root is not None else None
    if target is None or root is None or index is None:
        return None
    data = list(table.dims)
    axis = _axis(gather) % len(data)
    shape = [int(d) for d in target]
    split = len(shape) - (len(data) - axis - 1)  # where the dims after the gathered axis start
    if -1 in shape or 0 in shape or split <= axis:
        return None
    index_shape = tuple(shape[axis:split])
    if (
        shape[:axis] != data[:axis]
        or shape[split:] != data[axis + 1 :]
        or int(np.prod(index_shape)) != int(np.prod(index.dims))
    ):
        return None
    return ShapedLookup(gather, reshape, root, index_shape)


def _index_root(graph: onnx.GraphProto, name: str) -> str | None:
    """The integer initializer ``name`` is, or is a chain of Reshapes of."""
    while _initializer(graph, name) is None:
        producer = next((n for n in graph.node if name in n.output), None)
        if producer is None or producer.op_type != "Reshape":
            return None
        name = producer.input[0]
    tensor = _initializer(graph, name)
    if tensor is None or tensor.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
        return None
    return name


def _index_only_feeds(graph: onnx.GraphProto, root: str, group: list[ShapedLookup]) -> bool:
    """Whether ``root`` reaches only the lookups of ``group`` (through Reshapes), all wanting
    one shape: then the initializer itself can take that shape."""
    if len({lookup.index_shape for lookup in group}) != 1 or root in _outputs(graph):
        return False
    gathers = {id(lookup.gather) for lookup in group}
    frontier = [root]
    while frontier:
        name = frontier.pop()
        for node in graph.node:
            if name not in node.input:
                continue
            if node.op_type == "Reshape" and node.input[0] == name:
                frontier.extend(node.output)
            elif id(node) not in gathers or node.input[1] != name or node.input[0] == name:
                return False
    return True


def _remove(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Remove ``nodes`` and the constants (shapes) that only they read."""
    inputs = {name for node in nodes for name in node.input}
    stale = inputs | {name for node in nodes for name in node.output}
    for info in [v for v in graph.value_info if v.name in stale]:  # shapes before the rewrite
        graph.value_info.remove(info)
    for node in nodes:
        graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | _outputs(graph)
    unread = inputs - read
    for tensor in [t for t in graph.initializer if t.name in unread]:
        graph.initializer.remove(tensor)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in unread]:
        graph.node.remove(node)


def _initializer(graph: onnx.GraphProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in graph.initializer if t.name == name), None)


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of an initializer or Constant node (small tensors only: shapes)."""
    tensor = _initializer(graph, name)
    if tensor is None:
        node = next((n for n in graph.node if n.op_type == "Constant" and name in n.output), None)
        attribute = next((a for a in node.attribute if a.name == "value"), None) if node else None
        tensor = attribute.t if attribute is not None else None
    if tensor is None or onnx.external_data_helper.uses_external_data(tensor):
        return None
    return numpy_helper.to_array(tensor)


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _outputs(graph: onnx.GraphProto) -> set[str]:
    return {o.name for o in graph.output}
