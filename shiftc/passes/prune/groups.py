"""Dependency analysis on an ONNX graph: groups of coupled channels that are removed together.

A group starts at the output-channel axis of a constant weight (MatMul/Gemm columns, Conv output
channels) and grows by a breadth-first walk over *dimensions* ``(tensor, axis)`` through the
channel rules of :mod:`.rules`, in both directions: every tensor reached is followed to its
producer and to all its consumers (an initializer to every node that uses it). The walk stops at
weights' contraction axes (MatMul K, Conv input channels: the rows removed there are the second
half of the group) and at ops that do not touch the axis. The result per group:

    units        how many independently removable units (channels, or KV groups with their heads)
    dims         {(tensor, axis): (idx, unit)} every coupled dimension; ``idx`` element indices on
                 the axis, ``unit`` the unit of each
    weights      the initializers among them (sliced on removal)
    edits        Reshape shape constants, Split sizes and Conv ``group`` attributes to rewrite
    refusal      why the group cannot be pruned, or None

Units start as single elements; when a Reshape splits the axis into heads the walk restarts with
units merged (``q_proj`` columns become KV groups of G query heads × head_dim). A group is refused
when it reaches a graph input or output (other than a declared KV cache), a reduction or
normalisation over the channel axis (RMSNorm's mean: the residual stream), an op without a rule,
or a computed shape.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import numpy_helper

from .rules import RULES, Coarsen, Refuse

WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class Dim:
    tensor: str
    axis: int
    idx: np.ndarray  # element indices on the axis
    unit: np.ndarray  # unit of each element

    def replace(self, **kw) -> "Dim":
        return replace(self, **kw)


@dataclass
class Group:
    root: str  # the weight initializer whose output channels started the group
    units: int
    dims: dict = field(default_factory=dict)  # (tensor, axis) -> Dim
    weights: list = field(default_factory=list)  # Dims of initializers
    edits: dict = field(default_factory=dict)  # (kind, node name) -> dict
    io: list = field(default_factory=list)  # Dims of graph inputs / outputs
    refusal: str | None = None
    kind: str = "channels"  # mlp | heads | channels
    layers: list = field(default_factory=list)  # compute weights (MatMul/Gemm B, Conv W) touched


class GraphInfo:
    """Shapes, producers, consumers and constants of a model (read-only)."""

    def __init__(self, model: onnx.ModelProto):
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        g = inferred.graph
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self._const_cache: dict[str, np.ndarray] = {}
        self.shapes: dict[str, list | None] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                        for d in t.shape.dim]
        for name, t in self.inits.items():
            self.shapes[name] = list(t.dims)
        self.producer: dict[str, tuple] = {}
        self.consumers: dict[str, list] = {}
        for node in model.graph.node:
            for i, o in enumerate(node.output):
                self.producer[o] = (node, i)
            for i, x in enumerate(node.input):
                if x:
                    self.consumers.setdefault(x, []).append((node, i))
        self.graph_inputs = {i.name for i in model.graph.input} - set(self.inits)
        self.graph_outputs = {o.name for o in model.graph.output}
        self.nodes = {n.name: n for n in model.graph.node}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            if name not in self._const_cache:
                self._const_cache[name] = numpy_helper.to_array(self.inits[name])
            return self._const_cache[name]
        prod = self.producer.get(name)
        if prod and prod[0].op_type == "Constant":
            for a in prod[0].attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def compute_weights(self) -> list[tuple[onnx.NodeProto, str, int]]:
        """(node, weight initializer, output-channel axis) for every layer with a constant weight."""
        out = []
        for node in self.model.graph.node:
            if node.op_type not in WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in self.inits:
                continue
            w = node.input[1]
            rank = len(self.inits[w].dims)
            if node.op_type == "MatMul" and rank >= 2:
                out.append((node, w, rank - 1))
            elif node.op_type == "Gemm":
                tb = next((a.i for a in node.attribute if a.name == "transB"), 0)
                out.append((node, w, 0 if tb else 1))
            elif node.op_type == "Conv":
                out.append((node, w, 0))
        return out


class _Walk:
    """One breadth-first walk from a root dimension (the rules call ``link`` and ``edit``)."""

    def __init__(self, info: GraphInfo, cache_io: set[str]):
        self.info = info
        self.cache_io = cache_io
        self.group: Group | None = None
        self.queue: deque = deque()

    # -- the interface of the rules --
    def rank(self, name: str) -> int:
        s = self.info.shapes.get(name)
        if s is None:
            raise Refuse(f"the rank of tensor '{name}' is unknown (shape inference failed)")
        return len(s)

    def shape(self, name: str):
        return self.info.shapes.get(name)

    def dim(self, name: str, axis: int):
        s = self.info.shapes.get(name)
        return None if s is None or axis >= len(s) else s[axis]

    def const(self, name: str):
        return self.info.const(name)

    def link(self, tensor: str, axis: int, d: Dim) -> None:
        self.queue.append(Dim(tensor, axis, d.idx, d.unit))

    def edit(self, kind: str, node: str, axis: int | None = None, **kw) -> None:
        e = self.group.edits.setdefault((kind, node), {"axes": set()})
        if axis is not None:
            e["axes"].add(axis)
        e.update(kw)

    # -- the walk --
    def run(self, root: str, axis: int, size: int, merge: int, group: Group) -> None:
        self.group = group
        self.queue = deque([Dim(root, axis, np.arange(size), np.arange(size) // merge)])
        info = self.info
        while self.queue:
            d = self.queue.popleft()
            key = (d.tensor, d.axis)
            if key in group.dims:
                old = group.dims[key]
                if not (np.array_equal(old.idx, d.idx) and np.array_equal(old.unit, d.unit)) and group.refusal is None:
                    group.refusal = f"tensor '{d.tensor}' axis {d.axis} is reached with two different channel maps"
                continue
            group.dims[key] = d
            if d.tensor in info.inits:
                group.weights.append(d)
            if d.tensor in info.graph_inputs or d.tensor in info.graph_outputs:
                group.io.append(d)
                if d.tensor not in self.cache_io and group.refusal is None:
                    what = "graph input" if d.tensor in info.graph_inputs else "graph output"
                    group.refusal = f"tensor '{d.tensor}' is a {what}: its width (axis {d.axis}) must be kept"
            ports = []
            if d.tensor in info.producer:
                node, i = info.producer[d.tensor]
                ports.append((node, ("out", i)))
            for node, i in info.consumers.get(d.tensor, []):
                ports.append((node, ("in", i)))
            for node, port in ports:
                fn = RULES.get(node.op_type)
                try:
                    if fn is None:
                        raise Refuse(f"op {node.op_type} ('{node.name}') has no channel rule")
                    if node.op_type == "Shape":
                        raise Refuse(f"Shape '{node.name}' reads the width (computed shapes are not rewritten)")
                    fn(self, node, port, d)
                except Refuse as e:
                    if group.refusal is None:
                        group.refusal = str(e)
                except Coarsen:
                    if group.refusal is None:
                        raise


def analyze(model: onnx.ModelProto, info: GraphInfo | None = None) -> list[Group]:
    """All channel groups of ``model``, each rooted at a constant weight not covered by an earlier one."""
    info = info or GraphInfo(model)
    from ...frontend import metadata as md

    cache_io = set()
    if md.get_info(model).get("decoder"):
        cache_io = {n for n in info.graph_inputs | info.graph_outputs
                    if n.startswith(("past_key_values.", "present."))}
    cw = info.compute_weights()
    compute = frozenset(w for _, w, _ in cw)
    covered: set[tuple[str, int]] = set()
    groups: list[Group] = []
    for node, w, axis in cw:
        if (w, axis) in covered:
            continue
        size = info.shapes[w][axis]
        merge = 1
        while True:
            group = Group(root=w, units=size // merge)
            try:
                _Walk(info, cache_io).run(w, axis, size, merge, group)
                break
            except Coarsen as c:
                merge *= c.factor
                if size % merge:
                    group.refusal = f"{c}: {size} channels do not divide into units of {merge}"
                    break
        covered.update(group.dims)
        # KV cache dims only make sense at the KV-head axis (1) of [B, KVH, T, D]
        for d in group.io:
            if d.tensor in cache_io and d.axis != 1 and group.refusal is None:
                group.refusal = f"KV cache '{d.tensor}' would change on axis {d.axis} (only KV heads, axis 1, may go)"
        weights = {x.tensor for x in group.weights}
        group.layers = [x.tensor for x in group.weights if x.tensor in compute]
        conv = any(n.op_type == "Conv" and n.input[1] in weights for n, _, _ in cw)
        group.kind = "channels" if conv else "heads" if any(k[0] == "reshape" for k in group.edits) else "mlp"
        groups.append(group)
    return groups
