"""Models for evaluating a plan: quantized weights written back as fp32 (Ŵ), in ONNX.

A plan evaluated this way gives the same logits as the compressed model's BcqMatMul ops run
through their ONNX function bodies (both compute x·Ŵᵀ with the same Ŵ), but ONNX Runtime loads it
quickly: it does not have to constant-fold one function body per layer. Used by the benchmark
(plans assembled from the per-layer cache, no re-quantization) and by the report's perplexity of
a compressed file (:func:`dequantized_copy`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .. import ops


def with_weights(model: onnx.ModelProto, targets, w_hat, in_place: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` (``in_place``: the model itself) whose target layers compute with
    ``w_hat[name]`` [N, K] (fp32); ``w_hat`` is a dict or a function name -> array (called once per
    layer, so only one layer's Ŵ is in memory at a time)."""
    from ..graph import remove_dead

    if in_place:
        out = model
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    get = w_hat.get if isinstance(w_hat, dict) else w_hat
    inits = {t.name: t for t in out.graph.initializer}
    nodes = {(n.name or n.output[0]): n for n in out.graph.node}
    for t in targets:
        w = get(t.name)
        if w is None:
            continue
        w = np.asarray(w, np.float32)
        if t.transposed:
            inits[t.weight].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), t.weight))
        else:  # Gemm with transB, or the tied head: a new initializer for this node only
            name = f"{t.name}.mp_dequant"
            node = nodes[t.node]
            if node.op_type == "Gemm":
                out.graph.initializer.append(numpy_helper.from_array(w, name))
            else:
                out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
            node.input[1] = name
    remove_dead(out.graph)
    return out


dequantized_copy = ops.dequantized_copy  # BcqMatMul -> MatMul(x, Ŵᵀ) (shiftc/passes/ops/)
