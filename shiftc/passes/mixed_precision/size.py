"""Exact byte counts of a shift-add output, for ``--size-budget-mb``.

The size of a compressed model is the bytes of every initializer of the written ONNX file
(ops.bytes_by_kind(model)["total"]). It splits into

  * a fixed part that no choice of widths changes: every initializer the pass leaves in place
    (norm gains, rope tables, biases, layers it skips, an fp32 embedding table still read by its
    Gather) plus the token embedding's table of its own at ``embedding_bits`` / ``embedding_group``
    (QGather codes, float16 scales and mins) — nothing extra when the Gather reads the head's
    planes (``tied_embedding``);
  * per quantized layer, its stored arrays at the chosen width (:func:`layer_bytes`).

:func:`fixed_bytes` works out which initializers survive by running the pass's own liveness
analysis (graph.remove_dead) on a data-free skeleton of the rewritten graph, so the count
follows the pass's rules (tied heads, Gemm biases, shared tables) without quantizing anything.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .. import bcq, shiftadd
from ..graph import attrs, node_id, remove_dead


def layer_bytes(n: int, k: int, bits: int, group: int, scale_mode: str) -> int:
    """Bytes of one quantized layer W [N, K] as the pass stores it.

    Planes: uint32 [q, N, ceil(K/32)] (csrc/include/shiftc/packed.h; columns padded to 32).
    Scales: BCQ int8 exponents [q, N, ceil(K/G), T] (T = 1 for pow2, 2 for pow2x2); uniform one
    float16 scale and one float16 min per row and group [N, ceil(K/G)]."""
    n, k, bits, group = int(n), int(k), int(bits), int(group)
    words, groups = -(-k // bcq.WORD_BITS), -(-k // group)
    planes = 4 * bits * n * words
    if scale_mode == "uniform":
        return planes + 2 * 2 * n * groups
    return planes + bits * n * groups * bcq.SCALE_MODES[scale_mode]


def embedding_table_bytes(n: int, k: int, bits: int, group: int) -> int:
    """Bytes of a QGather table [N, K] (shiftadd.embedding_tables / uniform.quantize): codes uint8
    [N, ceil(K/(8/q))·(8/q)·q/8] and float16 scales and mins [N, ceil(K/G)]."""
    per = 8 // int(bits)
    codes = int(n) * (-(-int(k) // per))
    return codes + 2 * 2 * int(n) * (-(-int(k) // int(group)))


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of an initializer as ops.bytes_by_kind counts them."""
    if t.HasField("raw_data"):
        return len(t.raw_data)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    from onnx import numpy_helper

    return int(numpy_helper.to_array(t).nbytes)


def _skeleton(model: onnx.ModelProto) -> onnx.GraphProto:
    """The graph's nodes, inputs, outputs and initializer *names* (no data)."""
    g = onnx.GraphProto()
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    for t in model.graph.initializer:
        g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
    return g


def fixed_bytes(model: onnx.ModelProto, targets, cfg) -> dict:
    """The part of the output's size no width changes (see the module docstring).

    Returns {"bytes": total, "kept": {initializer: bytes} left as they are, "embedding": {table:
    bytes} of the QGather tables, "tied": [tables read through the head's planes]}."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {i.name for i in g.input}
    nodes = list(g.node)
    by_id = {node_id(n): i for i, n in enumerate(nodes)}
    replaced: dict[int, list[str]] = {}  # node index -> the inputs its replacement reads from the old graph
    for t in targets:
        replaced[by_id[t.node]] = [t.x] + ([t.bias] if t.bias else [])
    tied = []
    if cfg.tied_embedding:  # shiftadd.ShiftAddPass._tied_gathers: the Gather reads the head's planes
        heads = {t.weight for t in targets if not t.transposed}
        for i, n in enumerate(nodes):
            if n.domain in ("", "ai.onnx") and n.op_type == "Gather" and n.input[0] in heads \
                    and int(attrs(n).get("axis", 0)) == 0:
                replaced[i] = [n.input[1]]
                tied.append(n.input[0])
    tables: dict[str, int] = {}
    if cfg.embedding_bits:  # shiftadd.embedding_tables: a large table gets a QGather table of its own
        for i, n in enumerate(nodes):
            if i in replaced or n.domain not in ("", "ai.onnx") or n.op_type != "Gather":
                continue
            t = inits.get(n.input[0])
            if t is None or len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT or \
                    int(np.prod(t.dims)) < shiftadd.EMBEDDING_MIN_WEIGHTS or n.input[1] not in graph_inputs or \
                    int(attrs(n).get("axis", 0)) != 0:
                continue
            replaced[i] = [n.input[1]]
            tables.setdefault(n.input[0], embedding_table_bytes(t.dims[0], t.dims[1], cfg.embedding_bits,
                                                                cfg.embedding_group))
    skel = _skeleton(model)
    for i, reads in replaced.items():  # the replacement node: same outputs, reads only what it keeps
        old = nodes[i]
        skel.node[i].CopyFrom(helper.make_node("Replaced", reads, list(old.output), name=node_id(old),
                                               domain="size.skeleton"))
    remove_dead(skel)
    kept = {t.name: tensor_bytes(inits[t.name]) for t in skel.initializer}
    return {"bytes": int(sum(kept.values()) + sum(tables.values())), "kept": kept, "embedding": tables, "tied": tied}


def layer_bytes_table(table, scale_mode: str) -> np.ndarray:
    """int64 [layers, widths]: :func:`layer_bytes` of every layer of a SensitivityTable at every width."""
    return np.array([[layer_bytes(ly.shape[0], ly.shape[1], b, ly.group or table.group, scale_mode)
                      for b in table.bits] for ly in table.layers], np.int64)
