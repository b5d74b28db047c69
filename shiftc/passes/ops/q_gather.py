"""QGather: an embedding table of its own on a uniform grid.

``Y = Ŵ[indices]``, ``Ŵ[n, k] = scales[n, g]·c[n, k] + mins[n, g]`` (g = k / G): an embedding table
on a uniform asymmetric grid of 2^q levels per group of G columns (the table of its own that the
shift-add pass gives a token embedding; math in shiftc/passes/uniform.py).

inputs
    indices  int64   [...]                  row numbers in [-N, N)
    codes    uint8   [N, ceil(K·q/8)]       code k of a row in bits (k·q) % 8 .. of byte k·q/8, low bits first
    scales   float16 [N, ceil(K/G)]
    mins     float16 [N, ceil(K/G)]
attributes: bits (q: 2, 4 or 8), group_size (G), in_features (K)
output
    Y        float32 [..., K]
Effectively q + 32/G bits per weight (q = 4, G = 32: 5).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .spec import DOMAIN, MIN_OPSET, OpSpec, attr_const, const, group_broadcast


def qgather_weight(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, *, bits: int, group_size: int,
                   in_features: int, **_) -> np.ndarray:
    """Ŵ [N, K] float32 of a QGather table."""
    from ..uniform import dequantize

    return dequantize(codes, scales, mins, bits, group_size, in_features)


def qgather_ref(indices: np.ndarray, codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, *, bits: int,
                group_size: int, in_features: int) -> np.ndarray:
    """numpy reference of QGather: rows ``indices`` of Ŵ."""
    w = qgather_weight(codes, scales, mins, bits=bits, group_size=group_size, in_features=in_features)
    return w[np.asarray(indices, np.int64)]


def qgather_function(opset: int) -> onnx.FunctionProto:
    """The ONNX function body of ``ai.shiftc::QGather``: rows gathered first, then unpacked by two
    shifts per code, ``c = (byte << (8 − q − shift)) >> (8 − q)``, and scaled."""
    if opset < MIN_OPSET:
        raise ValueError(f"QGather's function body needs opset >= {MIN_OPSET}, got {opset}")
    f32, i64, u8 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.UINT8
    nodes = [
        const("flat", np.array([-1], np.int64), i64),
        const("ax_last", np.array([-1], np.int64), i64),
        const("ax_0", np.array([0], np.int64), i64),
        const("zero_i", np.array([0], np.int64), i64),
        const("zero_s", np.array(0, np.int64), i64),
        const("eight", np.array(8, np.int64), i64),
        const("shape_r_", np.array([0, -1], np.int64), i64),
        attr_const("q_scalar", "bits"),
        attr_const("k_scalar", "in_features"),
        attr_const("g_scalar", "group_size"),
        helper.make_node("Unsqueeze", ["k_scalar", "ax_0"], ["k_1"]),
        helper.make_node("Unsqueeze", ["g_scalar", "ax_0"], ["g_1"]),
        helper.make_node("Reshape", ["indices", "flat"], ["rows"]),
        helper.make_node("Gather", ["table_codes", "rows"], ["codes"], axis=0),  # [R, Bc]
        helper.make_node("Gather", ["table_scales", "rows"], ["scales16"], axis=0),  # [R, ng]
        helper.make_node("Gather", ["table_mins", "rows"], ["mins16"], axis=0),
        # codes per byte: shifts 0, q, 2q, ... < 8; c = (byte << (8 - q - shift)) >> (8 - q)
        helper.make_node("Range", ["zero_s", "eight", "q_scalar"], ["shifts"]),
        helper.make_node("Sub", ["eight", "q_scalar"], ["right_i"]),
        helper.make_node("Sub", ["right_i", "shifts"], ["left_i"]),
        helper.make_node("Cast", ["left_i"], ["left"], to=u8),
        helper.make_node("Unsqueeze", ["right_i", "ax_0"], ["right_1"]),
        helper.make_node("Cast", ["right_1"], ["right"], to=u8),
        helper.make_node("Unsqueeze", ["codes", "ax_last"], ["bytes3"]),  # [R, Bc, 1]
        helper.make_node("BitShift", ["bytes3", "left"], ["shl"], direction="LEFT"),
        helper.make_node("BitShift", ["shl", "right"], ["c3"], direction="RIGHT"),  # [R, Bc, 8/q]
        helper.make_node("Reshape", ["c3", "shape_r_"], ["c_flat"]),
        helper.make_node("Slice", ["c_flat", "zero_i", "k_1", "ax_last"], ["c_k"]),
        helper.make_node("Cast", ["c_k"], ["c_f"], to=f32),
        # scales and mins [R, ng] -> [R, ng, G] -> [R, ng*G] -> [:K]
        *group_broadcast("scales16", "s_k", 2, "shape_r_", cast=True),
        *group_broadcast("mins16", "m_k", 2, "shape_r_", cast=True),
        helper.make_node("Mul", ["c_f", "s_k"], ["cs"]),
        helper.make_node("Add", ["cs", "m_k"], ["w"]),  # [R, K]
        helper.make_node("Shape", ["indices"], ["idx_shape"]),
        helper.make_node("Concat", ["idx_shape", "k_1"], ["y_shape"], axis=0),
        helper.make_node("Reshape", ["w", "y_shape"], ["Y"]),
    ]
    return helper.make_function(
        DOMAIN, "QGather", ["indices", "table_codes", "table_scales", "table_mins"], ["Y"], nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["bits", "group_size", "in_features"],
        doc_string="Y = W[indices], W = scales * codes + mins per group; see shiftc/passes/ops/",
    )


Q_GATHER = OpSpec(
    name="QGather",
    inputs=(("indices", "int64 [...]"), ("codes", "uint8 [N, ceil(K*q/8)]"), ("scales", "float16 [N, ceil(K/G)]"),
            ("mins", "float16 [N, ceil(K/G)]")),
    outputs=(("Y", "float32 [..., K]"),),
    attributes=(("bits", "int: q, 2, 4 or 8"), ("group_size", "int: G"), ("in_features", "int: K")),
    function=qgather_function,
    reference=qgather_ref,
    weight=qgather_weight,
    kind="gather",
    initializers=(".q_codes", ".q_scales", ".q_mins"),
)
