"""UniformMatMul: a q-bit uniform grid per group as planes a shift apart (shift-add scale_mode uniform).

``Y = X · Ŵᵀ``,  ``Ŵ[n, k] = mins[n, g] + scales[n, g] · Σ_{i<q} 2^i·B_i[n, k]``,  B_i ∈ {0, 1}: a q-bit
uniform grid per group of G columns, written as q binary planes whose scales are a shift apart
(the shift-add pass's scale_mode "uniform"; math in shiftc/passes/uniform.py).

inputs
    X        float32 [..., K]
    planes   uint32  [q, N, ceil(K/32)]   bit i of weight (n, k)'s code, layout as BcqMatMul (packed.h)
    scales   float16 [N, ceil(K/G)]
    mins     float16 [N, ceil(K/G)]
attributes: bits (q, 1..4), group_size (G, a multiple of 32), in_features (K)
output
    Y        float32 [..., N]
Stored bits per weight: q + 32/G (q = 4, G = 32: 5). UniformGather(indices, planes, scales, mins)
reads rows of the same weight: the embedding lookup of a tied LM head, one copy in the model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..bcq import planes_to_codes
from .spec import MIN_OPSET, OpSpec, attr_const, const, group_broadcast, matmul_function, matmul_ref, plane_bit_nodes


def uniform_matmul_weight(planes: np.ndarray, scales: np.ndarray, mins: np.ndarray, *, group_size: int,
                          in_features: int, **_) -> np.ndarray:
    """Ŵ [N, K] float32 of an UniformMatMul / UniformGather."""
    from ..uniform import grid_weight

    return grid_weight(planes_to_codes(planes, in_features), scales, mins, group_size)


def uniform_matmul_ref(x: np.ndarray, planes: np.ndarray, scales: np.ndarray, mins: np.ndarray, *, bits: int,
                       group_size: int, in_features: int, bias: np.ndarray | None = None) -> np.ndarray:
    """numpy reference of UniformMatMul: ``X Ŵᵀ (+ bias)``, accumulated in float64, returned as float32."""
    if planes.shape[0] != bits:
        raise ValueError(f"bits={bits} but planes {planes.shape}")
    w = uniform_matmul_weight(planes, scales, mins, group_size=group_size, in_features=in_features)
    return matmul_ref(x, w, bias)



def uniform_weight_nodes() -> list[onnx.NodeProto]:
    """Function-body nodes reading ``planes`` [q,N,W], ``scales`` and ``mins`` [N,ng] (float16) and
    writing ``w`` = Ŵ [N, K] float32 (attributes ``in_features``, ``group_size`` read), ``k_1``."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = plane_bit_nodes() + [
        const("zero_s", np.array(0, np.int64), i64),
        const("one_s", np.array(1, np.int64), i64),
        const("shape_n_", np.array([0, -1], np.int64), i64),
        const("shape_q11", np.array([-1, 1, 1], np.int64), i64),
        const("two", np.array(2.0, np.float32), f32),
        attr_const("q_scalar", "bits"),
        # codes [N,K] = sum_i 2^i b_i
        helper.make_node("Range", ["zero_s", "q_scalar", "one_s"], ["plane_i"]),
        helper.make_node("Cast", ["plane_i"], ["plane_f"], to=f32),
        helper.make_node("Pow", ["two", "plane_f"], ["pow2"]),
        helper.make_node("Reshape", ["pow2", "shape_q11"], ["pow2_q11"]),
        helper.make_node("Mul", ["b_f", "pow2_q11"], ["b_w"]),
        helper.make_node("ReduceSum", ["b_w", "ax_0"], ["codes"], keepdims=0),
        # scales and mins [N,ng] -> [N,ng,G] -> [N,ng*G] -> [:K]
        *group_broadcast("scales", "s_k", 2, "shape_n_", cast=True),
        *group_broadcast("mins", "m_k", 2, "shape_n_", cast=True),
    ]
    nodes += [helper.make_node("Mul", ["codes", "s_k"], ["cs"]), helper.make_node("Add", ["cs", "m_k"], ["w"])]
    return nodes


def uniform_matmul_function(opset: int) -> onnx.FunctionProto:
    """The ONNX function body of ``ai.shiftc::UniformMatMul`` for a model of default-domain ``opset``."""
    if opset < MIN_OPSET:
        raise ValueError(f"UniformMatMul's function body needs opset >= {MIN_OPSET}, got {opset}")
    return matmul_function("UniformMatMul", uniform_weight_nodes(), ["planes", "scales", "mins"],
                            ["bits", "group_size", "in_features"], opset,
                            "Y = X W^T, W = mins + scales * sum_i 2^i B_i (B in {0,1}); see shiftc/passes/ops/")



UNIFORM_ATTRS = (("bits", "int: q, 1..4"), ("group_size", "int: G, multiple of 32"), ("in_features", "int: K"))
UNIFORM_MATMUL = OpSpec(
    name="UniformMatMul",
    inputs=(("X", "float32 [..., K]"), ("planes", "uint32 [q, N, ceil(K/32)]"),
            ("scales", "float16 [N, ceil(K/G)]"), ("mins", "float16 [N, ceil(K/G)]")),
    outputs=(("Y", "float32 [..., N]"),),
    attributes=UNIFORM_ATTRS,
    function=uniform_matmul_function,
    reference=uniform_matmul_ref,
    weight=uniform_matmul_weight,
    initializers=(".uq_planes", ".uq_scales", ".uq_mins"),
    coding="01",
)
