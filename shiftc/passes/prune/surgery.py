"""Graph surgery: remove chosen units of channel groups from an ONNX model (no math here).

For every group and its removed units: each initializer dimension loses the elements of those
units (``np.delete`` on the original indices, all groups at once, so a weight pruned on both
axes is cut once per axis); each Reshape shape constant touched gets a private copy with the new
width (shape constants are shared between layers in shiftc's decoder graphs); Split sizes and
Conv ``group`` attributes are recomputed; declared shapes of graph inputs/outputs (KV caches)
shrink. ``value_info`` is dropped and shape inference re-run, so the result is checked afresh.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .groups import GraphInfo, Group


def _removed(d, units: np.ndarray) -> np.ndarray:
    return np.sort(d.idx[np.isin(d.unit, units)])


def apply(model: onnx.ModelProto, info: GraphInfo, plan: list[tuple[Group, np.ndarray]]) -> onnx.ModelProto:
    """Return a pruned copy of ``model``; ``plan`` holds (group, unit ids to remove)."""
    cut: dict[tuple[str, int], set] = {}  # (tensor, axis) -> removed element indices
    edits: dict[tuple[str, str], dict] = {}
    for group, units in plan:
        if len(units) == 0:
            continue
        for d in group.dims.values():
            cut.setdefault((d.tensor, d.axis), set()).update(_removed(d, units).tolist())
        for key, e in group.edits.items():
            edits.setdefault(key, {}).update(e)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    # initializers
    by_name = {t.name: t for t in g.initializer}
    per_init: dict[str, list] = {}
    for (name, axis), idx in cut.items():
        if name in by_name:
            per_init.setdefault(name, []).append((axis, sorted(idx)))
    for name, cuts in per_init.items():
        arr = numpy_helper.to_array(by_name[name])
        for axis, idx in cuts:
            arr = np.delete(arr, idx, axis=axis)
        by_name[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))

    def new_const(hint: str, values) -> str:
        name = hint
        k = 0
        while name in by_name:
            k += 1
            name = f"{hint}_{k}"
        t = numpy_helper.from_array(np.asarray(values, np.int64), name)
        g.initializer.append(t)
        by_name[name] = g.initializer[-1]
        return name

    nodes = {n.name: n for n in g.node}
    for (kind, node_name), e in edits.items():
        node = nodes[node_name]
        if kind == "reshape":
            shape = info.const(node.input[1]).copy()
            for axis in e["axes"]:
                n_cut = len(cut.get((node.output[0], axis), ()))
                if shape[axis] > 0:
                    shape[axis] -= n_cut
            if not np.array_equal(shape, info.const(node.input[1])):
                node.input[1] = new_const(f"{node_name}.shape", shape)
        elif kind == "split":
            (axis,) = e["axes"]
            sizes = [info.shapes[o][axis] - len(cut.get((o, axis), ())) for o in node.output]
            if len(node.input) > 1 and node.input[1]:
                node.input[1] = new_const(f"{node_name}.split", sizes)
            else:
                for a in node.attribute:
                    if a.name == "split":
                        a.CopyFrom(helper.make_attribute("split", sizes))
        elif kind == "conv_group":
            removed = len(cut.get((node.output[0], 1), ()))
            for a in node.attribute:
                if a.name == "group":
                    a.i -= removed // e["per_group_out"]
    # declared shapes of graph inputs / outputs
    for vi in list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        for axis in range(len(dims)):
            n_cut = len(cut.get((vi.name, axis), ()))
            if n_cut and dims[axis].HasField("dim_value"):
                dims[axis].dim_value -= n_cut
    del g.value_info[:]
    # drop initializers no node uses any more (shape constants replaced by private copies)
    used = {x for n in g.node for x in n.input} | {o.name for o in g.output} | {i.name for i in g.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return out
