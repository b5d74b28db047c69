"""Helpers on ONNX graphs that every pass uses (no pass logic here)."""

from __future__ import annotations

import onnx
from onnx import helper


def attrs(node: onnx.NodeProto) -> dict:
    """The node's attributes by name, as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def node_id(node: onnx.NodeProto) -> str:
    """A node's name, or its first output when it has none."""
    return node.name or node.output[0]


def used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    stack = list(graph.node)
    while stack:
        n = stack.pop()
        used.update(i for i in n.input if i)
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                used.update(o.name for o in sub.output)
                stack.extend(sub.node)
    return used


def remove_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs is used, then initializers nothing reads (to a fixpoint)."""
    while True:
        used = used_names(graph)
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = used_names(graph)
    inputs = {i.name for i in graph.input}
    live = [t for t in graph.initializer if t.name in used or t.name in inputs]
    if len(live) != len(graph.initializer):
        kept = []
        for t in live:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            kept.append(c)
        del graph.initializer[:]
        graph.initializer.extend(kept)
