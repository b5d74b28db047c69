"""FdbMatMul: the binarize pass's op ({0,1} planes, float16 scales and offsets).

``Y = X · Ŵᵀ``,  ``Ŵ [N, K] = Σ_{i<q} α_i ⊙ B_i + μ``,  B_i ∈ {0, 1}, α and μ broadcast over groups
of G columns (the binarization pass, shiftc/passes/binarize.py; math in shiftc/passes/fdb.py).

inputs
    X        float32 [..., K]
    planes   uint32  [q, N, ceil(K/32)]   same bit layout as BcqMatMul (packed.h), padding bits zero
    scales   float16 [q, N, ceil(K/G)]    α_i, any sign
    offsets  float16 [N, ceil(K/G)]       μ
attributes
    bits  (q, 1..4; the pass writes 2 for "fdb" and 1 for "1bit"), group_size (G, a multiple
    of 32), in_features (K)
output
    Y        float32 [..., N]
As with BcqMatMul there is no bias input: a Gemm's C stays a standard Add after the op.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..bcq import unpack_planes
from .spec import MIN_OPSET, OpSpec, const, group_broadcast, matmul_function, matmul_ref, plane_bit_nodes


def fdb_matmul_weight(planes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, *, group_size: int,
                      in_features: int, **_) -> np.ndarray:
    """Ŵ [N, K] float32 of an FdbMatMul."""
    from ..fdb import reconstruct as fdb_reconstruct

    return fdb_reconstruct(unpack_planes(planes, in_features), scales, offsets, group_size)


def fdb_matmul_ref(x: np.ndarray, planes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, *, bits: int,
                   group_size: int, in_features: int, bias: np.ndarray | None = None) -> np.ndarray:
    """numpy reference of FdbMatMul: ``X Ŵᵀ (+ bias)``, accumulated in float64, returned as float32."""
    if planes.shape[0] != bits or scales.shape[0] != bits:
        raise ValueError(f"bits={bits} but planes {planes.shape} / scales {scales.shape}")
    w = fdb_matmul_weight(planes, scales, offsets, group_size=group_size, in_features=in_features)
    return matmul_ref(x, w, bias)


def fdb_matmul_function(opset: int) -> onnx.FunctionProto:
    """The ONNX function body of ``ai.shiftc::FdbMatMul`` for a model of default-domain ``opset``."""
    if opset < MIN_OPSET:
        raise ValueError(f"FdbMatMul's function body needs opset >= {MIN_OPSET}, got {opset}")

    i64 = TensorProto.INT64
    nodes = plane_bit_nodes() + [  # b_f: {0,1} coding, the bit is the factor
        const("shape_n_", np.array([0, -1], np.int64), i64),
        # scales [q,N,ng] -> [q,N,ng,G] -> [q,N,ng*G] -> [:K]; offsets likewise with one axis less
        *group_broadcast("scales", "alpha_k", 3, "shape_qn_", cast=True),
        *group_broadcast("offsets", "mu_k", 2, "shape_n_", cast=True),
        # W [N,K] = sum_i alpha_i * b_i + mu
        helper.make_node("Mul", ["alpha_k", "b_f"], ["planes_w"]),
        helper.make_node("ReduceSum", ["planes_w", "ax_0"], ["w_planes"], keepdims=0),
        helper.make_node("Add", ["w_planes", "mu_k"], ["w"]),
    ]
    return matmul_function("FdbMatMul", nodes, ["planes", "scales", "offsets"], ["bits", "group_size", "in_features"],
                            opset, "Y = X W^T, W = sum_i alpha_i * B_i + mu (B in {0,1}); see shiftc/passes/ops/")


FDB_MATMUL = OpSpec(
    name="FdbMatMul",
    inputs=(("X", "float32 [..., K]"), ("planes", "uint32 [q, N, ceil(K/32)]"),
            ("scales", "float16 [q, N, ceil(K/G)]"), ("offsets", "float16 [N, ceil(K/G)]")),
    outputs=(("Y", "float32 [..., N]"),),
    attributes=(("bits", "int: q, 1..4"), ("group_size", "int: G, multiple of 32"), ("in_features", "int: K")),
    function=fdb_matmul_function,
    reference=fdb_matmul_ref,
    weight=fdb_matmul_weight,
    initializers=(".fdb_planes", ".fdb_scales", ".fdb_offsets"),
    coding="01",
)
