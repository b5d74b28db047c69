"""BcqMatMul: the shift-add pass's op (binary-coded planes, power-of-two scales).

BcqMatMul
---------
``Y = X · Ŵᵀ``,  ``Ŵ [N, K] = Σ_{i<q} α_i ⊙ s(B_i)``,  α broadcast over groups of G columns.

inputs
    X       float32 [..., K]
    planes  uint32  [q, N, ceil(K/32)]   bit c%32 of word c/32 of row n of plane i = B_i[n, c];
                                          padding bits zero (csrc/include/shiftc/packed.h)
    exps    int8    [q, N, ceil(K/G), T] α = Σ_t 2^{e_t}; T = 1 ("pow2") or 2 ("pow2x2");
                                          e = −128 (:data:`shiftc.passes.bcq.NO_TERM`) means
                                          "no term" (contributes 0), so α = 0 is representable
attributes
    bits         int  q (1..4), must equal planes.shape[0]
    group_size   int  G, a multiple of 32
    in_features  int  K (the planes are padded to a multiple of 32)
    coding       str  "pm1": s(1) = +1, s(0) = −1 (signs live in B, so α ≥ 0);
                      "01" : s(b) = b — known to the numpy reference and packed.h, with no
                      function body (binarization's {0,1} planes are
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..bcq import NO_TERM, exps_to_alpha, reconstruct, unpack_planes
from .spec import MIN_OPSET, OpSpec, const, group_broadcast, matmul_function, matmul_ref, plane_bit_nodes


def bcq_matmul_weight(planes: np.ndarray, exps: np.ndarray, *, group_size: int, in_features: int,
                      coding: str = "pm1", **_) -> np.ndarray:
    """Ŵ [N, K] float32 of a BcqMatMul."""
    return reconstruct(unpack_planes(planes, in_features), exps_to_alpha(exps), group_size, coding)


def bcq_matmul_ref(x: np.ndarray, planes: np.ndarray, exps: np.ndarray, *, bits: int, group_size: int,
                   in_features: int, coding: str = "pm1", bias: np.ndarray | None = None) -> np.ndarray:
    """numpy reference of BcqMatMul: ``X Ŵᵀ (+ bias)``, accumulated in float64, returned as float32."""
    if planes.shape[0] != bits or exps.shape[0] != bits:
        raise ValueError(f"bits={bits} but planes {planes.shape} / exps {exps.shape}")
    w = bcq_matmul_weight(planes, exps, group_size=group_size, in_features=in_features, coding=coding)
    return matmul_ref(x, w, bias)


def bcq_weight_nodes() -> list[onnx.NodeProto]:
    """Function-body nodes reading ``planes`` [q,N,W] and ``exps`` [q,N,ng,T] (pm1 coding) and
    writing ``w`` = Ŵ [N, K] float32; the attributes ``in_features`` and ``group_size`` are read."""
    f32 = TensorProto.FLOAT
    return plane_bit_nodes() + [
        const("two", np.array(2.0, np.float32), f32),
        const("one", np.array(1.0, np.float32), f32),
        helper.make_node("Mul", ["b_f", "two"], ["b2"]),
        helper.make_node("Sub", ["b2", "one"], ["signs"]),  # pm1: s = 2b - 1, [q,N,K]
        # scales: exps [q,N,ng,T] -> alpha [q,N,ng] = sum_t (e == NO_TERM ? 0 : 2^e)
        helper.make_node("Cast", ["exps"], ["e_f"], to=f32),
        const("no_term", np.array(float(NO_TERM), np.float32), f32),
        const("zero_f", np.array(0.0, np.float32), f32),
        helper.make_node("Equal", ["e_f", "no_term"], ["is_none"]),
        helper.make_node("Pow", ["two", "e_f"], ["p2"]),
        helper.make_node("Where", ["is_none", "zero_f", "p2"], ["terms"]),
        helper.make_node("ReduceSum", ["terms", "ax_last"], ["alpha"], keepdims=0),
        # broadcast alpha over its G columns: [q,N,ng,1] expand [q,N,ng,G] -> [q,N,ng*G] -> [:K]
        *group_broadcast("alpha", "alpha_k", 3, "shape_qn_"),
        # W [N,K] = sum_i alpha_i * s_i
        helper.make_node("Mul", ["alpha_k", "signs"], ["planes_w"]),
        helper.make_node("ReduceSum", ["planes_w", "ax_0"], ["w"], keepdims=0),
    ]


def check_bcq_body(op: str, opset: int, coding: str) -> None:
    if opset < MIN_OPSET:
        raise ValueError(f"{op}'s function body needs opset >= {MIN_OPSET}, got {opset}")
    if coding != "pm1":
        raise ValueError(f"coding {coding!r} has no function body; use 'pm1' ({{0,1}} planes: FdbMatMul)")


def bcq_matmul_function(opset: int, coding: str = "pm1") -> onnx.FunctionProto:
    """The ONNX function body of ``ai.shiftc::BcqMatMul`` for a model of default-domain ``opset``."""
    check_bcq_body("BcqMatMul", opset, coding)
    return matmul_function("BcqMatMul", bcq_weight_nodes(), ["planes", "exps"], BCQ_BODY_ATTRS, opset,
                            "Y = X W^T, W = sum_i alpha_i * (2 B_i - 1); see shiftc/passes/ops/")


BCQ_BODY_ATTRS = ["bits", "group_size", "in_features", "coding"]


BCQ_MATMUL = OpSpec(
    name="BcqMatMul",
    inputs=(("X", "float32 [..., K]"), ("planes", "uint32 [q, N, ceil(K/32)]"),
            ("exps", "int8 [q, N, ceil(K/G), T]")),
    outputs=(("Y", "float32 [..., N]"),),
    attributes=(("bits", "int: q, 1..4"), ("group_size", "int: G, multiple of 32"),
                ("in_features", "int: K"), ("coding", "string: 'pm1' ('01': reference only)")),
    function=bcq_matmul_function,
    reference=bcq_matmul_ref,
    weight=bcq_matmul_weight,
    initializers=(".bcq_planes", ".bcq_exps"),
    coding="pm1",
)

