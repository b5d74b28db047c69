"""One kernel call for the packed matmuls that read the same input (a backend-private ONNX rewrite).

A decoder layer multiplies one normalised activation by q, k and v, and another by gate and up. As
separate ``ai.shiftc`` matmuls each call builds the same tables of X (``shiftc_bcq_prepare``) and
opens its own parallel region on the thread pool; at decode, where a call is a few microseconds of
work, those fixed costs are a large part of the step. :func:`rewrite` concatenates the weights of
such a group along N — ``UniformMatMul``: planes [q, N, W] on axis 1, scales and mins [N, ng] on
axis 0; ``BcqMatMul``: planes and exponents on axis 1 — into one node whose output a standard
``Split`` on the last axis hands back to the original consumers. The rows of each weight are
unchanged and the kernels compute every output column independently, so the results are the
same numbers.

Only nodes with the same op, attributes (bits, group, K, coding) and input are grouped, and only
weights read by no other node (a tied head's planes, which its embedding lookup also reads, stay
apart). The ONNX file is not changed: this runs on the graph the compiler imports.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..passes.ops import DOMAIN

# op -> the concatenation axis of each weight input (inputs 1..)
_AXES = {"UniformMatMul": (1, 0, 0), "BcqMatMul": (1, 1)}


def _attrs(node: onnx.NodeProto) -> tuple:
    return tuple(sorted((a.name, helper.get_attribute_value(a)) for a in node.attribute))


def rewrite(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(the model with each group of same-input packed matmuls fused, number of nodes removed)."""
    g = model.graph
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    inits = {t.name: t for t in g.initializer}
    groups: dict[tuple, list[int]] = {}
    for idx, n in enumerate(g.node):
        if n.domain != DOMAIN or n.op_type not in _AXES or len(n.input) != 1 + len(_AXES[n.op_type]):
            continue
        if any(uses.get(w, 0) != 1 or w not in inits for w in n.input[1:]):  # shared, or not an initializer
            continue
        groups.setdefault((n.op_type, n.input[0], _attrs(n)), []).append(idx)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    drop_inits: set[str] = set()
    new_inits, replace_at, drop_nodes = [], {}, set()
    for (op, x, _), idxs in groups.items():
        nodes = [g.node[i] for i in idxs]
        first = nodes[0]
        names = []
        for j, axis in enumerate(_AXES[op]):
            arrays = [numpy_helper.to_array(inits[n.input[1 + j]]) for n in nodes]
            name = f"{first.input[1 + j]}.fused{len(nodes)}"
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(np.concatenate(arrays, axis=axis)), name))
            names.append(name)
            drop_inits.update(n.input[1 + j] for n in nodes)
        rows = [int(inits[n.input[1]].dims[1]) for n in nodes]  # N of each weight (planes [q, N, W])
        fused_out = f"{first.output[0]}.fused{len(nodes)}"
        fused = helper.make_node(op, [x, *names], [fused_out], name=f"{first.name or first.output[0]}_fused",
                                 domain=DOMAIN)
        fused.attribute.extend(first.attribute)
        sizes = f"{fused_out}.split_sizes"
        new_inits.append(numpy_helper.from_array(np.array(rows, np.int64), sizes))
        split = helper.make_node("Split", [fused_out, sizes], [n.output[0] for n in nodes], axis=-1,
                                 name=f"{fused.name}_split")
        replace_at[idxs[0]] = [fused, split]
        drop_nodes.update(idxs[1:])
    nodes = []
    for i, n in enumerate(g.node):
        if i in replace_at:
            nodes.extend(replace_at[i])
        elif i not in drop_nodes:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    keep = [t for t in g.initializer if t.name not in drop_inits]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    return out, len(drop_nodes)
