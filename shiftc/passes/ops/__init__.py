"""The ``ai.shiftc`` ops: one record per op (:class:`~.spec.OpSpec`), each in its own module.

:data:`OPS` is the one place to look an op up. A record says what the op's inputs and attributes
are, builds the ``onnx.FunctionProto`` that lets ONNX Runtime (or anyone) execute the op with
standard ONNX ops, names the numpy reference that kernels are tested against and the weight
reconstruction, and what the passes write for it. Kernels and the TVM lowering live in the backend
(``shiftc/backend/shiftc_ops.py``, registered under the record's name).

    bcq_matmul.py      BcqMatMul       Y = X Ŵᵀ, Ŵ = Σ α_i s(B_i), power-of-two α (shift-add)
    bcq_gather.py      BcqGather       rows of a BcqMatMul weight (a tied embedding)
    q_gather.py        QGather         rows of a table on a uniform grid (the embedding's own table)
    fdb_matmul.py      FdbMatMul       Y = X Ŵᵀ, Ŵ = Σ α_i B_i + μ, {0,1} planes (binarize)
    uniform_matmul.py  UniformMatMul   Y = X Ŵᵀ, Ŵ = min + scale·Σ 2^i B_i (shift-add, uniform grid)
    uniform_gather.py  UniformGather   rows of an UniformMatMul weight

Bias: no op has one. A bias stays a standard ``Add`` after the op (the backend fuses it); an
optional input in a function body would need the body to branch on the input's presence, which
ONNX functions cannot do. The function bodies unpack with shifts only, ``b_j = (w << (31 − j)) >> 31``,
so they need opset 11+ (BitShift) and 13+ (ReduceSum / Slice / Unsqueeze with input axes). They are
emitted with the model's own default-domain opset (17 … 21), since a model-local function must
import the same version.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..graph import remove_dead
from .bcq_gather import BCQ_GATHER, bcq_gather_ref
from .bcq_matmul import BCQ_MATMUL, bcq_matmul_ref, bcq_matmul_weight
from .fdb_matmul import FDB_MATMUL, fdb_matmul_ref, fdb_matmul_weight
from .q_gather import Q_GATHER, qgather_ref, qgather_weight
from .spec import DOMAIN, DOMAIN_VERSION, MIN_OPSET, OpSpec
from .uniform_gather import UNIFORM_GATHER, uniform_gather_ref
from .uniform_matmul import UNIFORM_MATMUL, uniform_matmul_ref, uniform_matmul_weight

__all__ = ["DOMAIN", "DOMAIN_VERSION", "MIN_OPSET", "OPS", "OpSpec", "BCQ_MATMUL", "BCQ_GATHER", "Q_GATHER",
           "FDB_MATMUL", "UNIFORM_MATMUL", "UNIFORM_GATHER", "add_functions", "bytes_by_kind", "dequantized_copy",
           "bcq_matmul_ref", "bcq_matmul_weight", "bcq_gather_ref", "qgather_ref", "qgather_weight",
           "fdb_matmul_ref", "fdb_matmul_weight", "uniform_matmul_ref", "uniform_matmul_weight", "uniform_gather_ref"]

#: op name -> record; the one table of shiftc's ops (domain :data:`DOMAIN`).
OPS: dict[str, OpSpec] = {s.name: s for s in (BCQ_MATMUL, BCQ_GATHER, Q_GATHER, FDB_MATMUL, UNIFORM_MATMUL,
                                              UNIFORM_GATHER)}


def add_functions(model: onnx.ModelProto, names: list[str]) -> None:
    """Add the function bodies of ops ``names`` (once each) and the ``ai.shiftc`` opset import."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ValueError("the model imports no default-domain opset")
    have = {(f.domain, f.name) for f in model.functions}
    for name in names:
        if (DOMAIN, name) not in have:
            model.functions.append(OPS[name].function(opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))



# -- accounting -----------------------------------------------------------------------------------


def bytes_by_kind(model: onnx.ModelProto) -> dict:
    """What the model's weights cost, bytes of its initializers by kind: ``quantized weights``
    (planes and scales of ai.shiftc matmuls; a tied table read by a gather too counts here, once),
    ``embedding tables`` (tables of their own of ai.shiftc gathers) and ``other`` (fp32 norms,
    rope tables, biases, weights left uncompressed)."""
    from onnx import numpy_helper

    kind_of: dict[str, str] = {}
    for n in model.graph.node:
        spec = OPS.get(n.op_type) if n.domain == DOMAIN else None
        for name in (n.input[1:] if spec is not None else ()):
            if kind_of.get(name) != "quantized weights":
                kind_of[name] = "embedding tables" if spec.kind == "gather" else "quantized weights"
    out = {"quantized weights": 0, "embedding tables": 0, "other": 0}
    for t in model.graph.initializer:
        out[kind_of.get(t.name, "other")] += len(t.raw_data) if t.HasField("raw_data") else numpy_helper.to_array(t).nbytes
    return {**out, "total": sum(out.values())}


# -- reference graphs -----------------------------------------------------------------------------


def dequantized_copy(model: onnx.ModelProto, fp32_head: str | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with every ``ai.shiftc`` matmul replaced by a standard MatMul whose
    weight Ŵᵀ is reconstructed in numpy (float32, the op table's ``weight``).

    The same numbers as the ops' function bodies (tests/test_shiftadd.py checks it), but ONNX
    Runtime does not have to inline and constant-fold one body per layer at session start, which
    for a 211-layer model takes far more memory. Used for evaluation and as the tests' reference.
    ``fp32_head``: the embedding initializer of a tied LM head; the head's op then becomes
    ``MatMul(x, Transpose(embedding))`` again (the head left in fp32)."""
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    graph_outs = {o.name for o in out.graph.output}
    nodes, made = [], set()
    for n in out.graph.node:
        spec = OPS.get(n.op_type) if n.domain == DOMAIN else None
        if spec is None:
            nodes.append(n)
        elif fp32_head and n.output[0] in graph_outs:
            t = fp32_head + ".fp32.T"
            nodes.append(helper.make_node("Transpose", [fp32_head], [t], perm=[1, 0], name=n.name + "_fp32_t"))
            nodes.append(helper.make_node("MatMul", [n.input[0], t], list(n.output), name=n.name))
        else:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
            gather = spec.kind == "gather"
            name = n.input[1] + (".dequant" if gather else ".dequant.T")
            if name not in made:  # a tied table: one reconstruction for all its gathers
                w = spec.weight(*(numpy_helper.to_array(inits[i]) for i in n.input[1:]), **attrs).astype(np.float32)
                out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w if gather else w.T), name))
                made.add(name)
            if gather:
                nodes.append(helper.make_node("Gather", [name, n.input[0]], list(n.output), name=n.name, axis=0))
            else:
                nodes.append(helper.make_node("MatMul", [n.input[0], name], list(n.output), name=n.name))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    keep = [f for f in out.functions if not (f.domain == DOMAIN and f.name in OPS)]
    del out.functions[:]
    out.functions.extend(keep)
    remove_dead(out.graph)
    return out
