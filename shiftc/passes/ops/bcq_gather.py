"""BcqGather: rows of a BcqMatMul weight.

``Y = Ŵ[indices]``: rows of a BcqMatMul weight, i.e. an embedding lookup on a quantized table. A
decoder whose LM head is tied to its embedding stores one copy: the head's BcqMatMul and the
embedding's BcqGather read the same ``planes`` and ``exps`` initializers (the shift-add pass).

inputs
    indices  int64   [...]                 row numbers in [-N, N) (negative: from the end, as Gather)
    planes   uint32  [q, N, ceil(K/32)]    as BcqMatMul
    exps     int8    [q, N, ceil(K/G), T]  as BcqMatMul
attributes: bits, group_size, in_features, coding — as BcqMatMul
output
    Y        float32 [..., K]
"""

from __future__ import annotations

import numpy as np
import onnx

from .bcq_matmul import BCQ_BODY_ATTRS, BCQ_MATMUL, bcq_matmul_weight, bcq_weight_nodes, check_bcq_body
from .spec import gather_function


def bcq_gather_ref(indices: np.ndarray, planes: np.ndarray, exps: np.ndarray, *, bits: int, group_size: int,
                   in_features: int, coding: str = "pm1") -> np.ndarray:
    """numpy reference of BcqGather: rows ``indices`` of Ŵ [N, K] (float32)."""
    if planes.shape[0] != bits or exps.shape[0] != bits:
        raise ValueError(f"bits={bits} but planes {planes.shape} / exps {exps.shape}")
    w = bcq_matmul_weight(planes, exps, group_size=group_size, in_features=in_features, coding=coding)
    return w[np.asarray(indices, np.int64)]


def bcq_gather_function(opset: int, coding: str = "pm1") -> onnx.FunctionProto:
    """The ONNX function body of ``ai.shiftc::BcqGather``: the rows are gathered from the packed
    planes and exponents first, so only those rows are reconstructed."""
    check_bcq_body("BcqGather", opset, coding)
    return gather_function("BcqGather", [("planes", 1), ("exps", 1)], bcq_weight_nodes(), BCQ_BODY_ATTRS, opset,
                            "Y = W[indices], W = sum_i alpha_i * (2 B_i - 1); see shiftc/passes/ops/")


BCQ_GATHER = BCQ_MATMUL.gather("BcqGather", bcq_gather_function, bcq_gather_ref)
