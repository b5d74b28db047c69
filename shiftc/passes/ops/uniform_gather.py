"""UniformGather: rows of an UniformMatMul weight (the embedding lookup of a tied LM head)."""

from __future__ import annotations

import numpy as np
import onnx

from .uniform_matmul import UNIFORM_MATMUL, uniform_matmul_weight, uniform_weight_nodes
from .spec import MIN_OPSET, gather_function


def uniform_gather_ref(indices: np.ndarray, planes: np.ndarray, scales: np.ndarray, mins: np.ndarray, *, bits: int,
                       group_size: int, in_features: int) -> np.ndarray:
    """numpy reference of UniformGather: rows ``indices`` of Ŵ."""
    if planes.shape[0] != bits:
        raise ValueError(f"bits={bits} but planes {planes.shape}")
    w = uniform_matmul_weight(planes, scales, mins, group_size=group_size, in_features=in_features)
    return w[np.asarray(indices, np.int64)]



def uniform_gather_function(opset: int) -> onnx.FunctionProto:
    """The ONNX function body of ``ai.shiftc::UniformGather``: rows gathered first, then unpacked."""
    if opset < MIN_OPSET:
        raise ValueError(f"UniformGather's function body needs opset >= {MIN_OPSET}, got {opset}")
    return gather_function("UniformGather", [("planes", 1), ("scales", 0), ("mins", 0)], uniform_weight_nodes(),
                            ["bits", "group_size", "in_features"], opset,
                            "Y = W[indices], W = mins + scales * sum_i 2^i B_i; see shiftc/passes/ops/")



UNIFORM_GATHER = UNIFORM_MATMUL.gather("UniformGather", uniform_gather_function, uniform_gather_ref)
