"""The ``ai.shiftc`` op table: for each op its schema, ONNX function body and numpy reference.

:data:`OPS` is the one place to look an op up. Each entry says what the op's inputs and attributes
are, builds the ``onnx.FunctionProto`` that lets ONNX Runtime (or anyone) execute the op with
standard ONNX ops, and names the numpy reference that kernels are tested against. Kernels and the
TVM lowering live in the backend (``shiftc/backend/importer.register_converter``).

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
                      function body (binarization's {0,1} planes are FdbMatMul, with offsets).
output
    Y       float32 [..., N]

Bias: the op has none. A bias stays a standard ``Add`` after the op (the backend fuses it); an
optional input in a function body would need the body to branch on the input's presence, which
ONNX functions cannot do.

The function body unpacks with shifts only, ``b_j = (w << (31 − j)) >> 31``, so it needs opset 11+
(BitShift) and 13+ (ReduceSum / Slice / Unsqueeze with input axes). It is emitted with the model's
own default-domain opset (17 … 21), since a model-local function must import the same version.

FdbMatMul
---------
``Y = X · Ŵᵀ``, ``Ŵ = Σ_i α_i ⊙ B_i + μ`` with {0,1} planes, float16 scales α [q, N, ceil(K/G)] and
offsets μ [N, ceil(K/G)]: the binarization pass's op (schema beside its function body below).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from .bcq import NO_TERM, exps_to_alpha, planes_to_codes, reconstruct, unpack_planes

DOMAIN = "ai.shiftc"
DOMAIN_VERSION = 1
MIN_OPSET = 13


@dataclass(frozen=True)
class OpSpec:
    name: str
    inputs: tuple[tuple[str, str], ...]  # (name, "dtype [shape]")
    outputs: tuple[tuple[str, str], ...]
    attributes: tuple[tuple[str, str], ...]  # (name, "type: meaning")
    function: Callable[[int], onnx.FunctionProto]  # opset -> function body
    reference: Callable[..., np.ndarray]  # numpy reference
    weight: Callable[..., np.ndarray]  # (constant inputs after X, **attributes) -> Ŵ [N, K] float32
    kind: str = "matmul"  # "matmul": Y = X Ŵᵀ; "gather": Y = Ŵ[indices] (X holds the indices)

    def gather(self, name: str, function, reference) -> "OpSpec":
        """The op reading the rows of this matmul op's weight: the same weight inputs after ``indices``."""
        return OpSpec(name=name, inputs=(("indices", "int64 [...]"), *self.inputs[1:]),
                      outputs=(("Y", "float32 [..., K]"),), attributes=self.attributes, function=function,
                      reference=reference, weight=self.weight, kind="gather")


# -- BcqMatMul ------------------------------------------------------------------------------------


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
    y = np.asarray(x, np.float64) @ w.astype(np.float64).T
    if bias is not None:
        y = y + bias
    return y.astype(np.float32)


def _const(name, value, dtype):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, np.shape(value), np.ravel(value).tolist()))


def _attr_const(name, attr):
    n = helper.make_node("Constant", [], [name])
    n.attribute.append(onnx.AttributeProto(name="value_int", ref_attr_name=attr, type=onnx.AttributeProto.INT))
    return n


def _plane_bit_nodes() -> list[onnx.NodeProto]:
    """Function-body nodes unpacking ``planes`` uint32 [q,N,W] into ``b_f`` float32 0/1 [q,N,K]
    (two shifts per bit, padding columns sliced off), with the constants the bodies share:
    ``ax_last``, ``ax_0``, ``zero_i``, ``shape_qn_`` and ``k_1``, ``g_1`` (attributes ``in_features``,
    ``group_size`` as 1-D tensors)."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    const, attr_const = _const, _attr_const
    return [
        const("left", np.arange(31, -1, -1, dtype=np.uint32), TensorProto.UINT32),  # 31 - j
        const("right", np.array([31], np.uint32), TensorProto.UINT32),
        const("ax_last", np.array([-1], np.int64), i64),
        const("ax_0", np.array([0], np.int64), i64),
        const("zero_i", np.array([0], np.int64), i64),
        const("shape_qn_", np.array([0, 0, -1], np.int64), i64),
        attr_const("k_scalar", "in_features"),
        attr_const("g_scalar", "group_size"),
        helper.make_node("Unsqueeze", ["k_scalar", "ax_0"], ["k_1"]),
        helper.make_node("Unsqueeze", ["g_scalar", "ax_0"], ["g_1"]),
        # planes [q,N,W] -> [q,N,W,32] of 0/1 by two shifts -> [q,N,W*32] -> first K columns
        helper.make_node("Unsqueeze", ["planes", "ax_last"], ["words"]),
        helper.make_node("BitShift", ["words", "left"], ["shl"], direction="LEFT"),
        helper.make_node("BitShift", ["shl", "right"], ["bits01"], direction="RIGHT"),
        helper.make_node("Reshape", ["bits01", "shape_qn_"], ["bits_flat"]),
        helper.make_node("Slice", ["bits_flat", "zero_i", "k_1", "ax_last"], ["bits_k"]),
        helper.make_node("Cast", ["bits_k"], ["b_f"], to=f32),
    ]


def _bcq_weight_nodes() -> list[onnx.NodeProto]:
    """Function-body nodes reading ``planes`` [q,N,W] and ``exps`` [q,N,ng,T] (pm1 coding) and
    writing ``w`` = Ŵ [N, K] float32; the attributes ``in_features`` and ``group_size`` are read."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    const = _const
    return _plane_bit_nodes() + [
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
        helper.make_node("Unsqueeze", ["alpha", "ax_last"], ["alpha4"]),
        const("ones3", np.array([1, 1, 1], np.int64), i64),
        helper.make_node("Concat", ["ones3", "g_1"], ["g_shape"], axis=0),
        helper.make_node("Expand", ["alpha4", "g_shape"], ["alpha_g"]),
        helper.make_node("Reshape", ["alpha_g", "shape_qn_"], ["alpha_flat"]),
        helper.make_node("Slice", ["alpha_flat", "zero_i", "k_1", "ax_last"], ["alpha_k"]),
        # W [N,K] = sum_i alpha_i * s_i
        helper.make_node("Mul", ["alpha_k", "signs"], ["planes_w"]),
        helper.make_node("ReduceSum", ["planes_w", "ax_0"], ["w"], keepdims=0),
    ]


def _check_bcq_body(op: str, opset: int, coding: str) -> None:
    if opset < MIN_OPSET:
        raise ValueError(f"{op}'s function body needs opset >= {MIN_OPSET}, got {opset}")
    if coding != "pm1":
        raise ValueError(f"coding {coding!r} has no function body; use 'pm1' ({{0,1}} planes: FdbMatMul)")


def bcq_matmul_function(opset: int, coding: str = "pm1") -> onnx.FunctionProto:
    """The ONNX function body of ``ai.shiftc::BcqMatMul`` for a model of default-domain ``opset``."""
    _check_bcq_body("BcqMatMul", opset, coding)
    return _matmul_function("BcqMatMul", _bcq_weight_nodes(), ["planes", "exps"], _BCQ_BODY_ATTRS, opset,
                            "Y = X W^T, W = sum_i alpha_i * (2 B_i - 1); see shiftc/passes/ops.py")


_BCQ_BODY_ATTRS = ["bits", "group_size", "in_features", "coding"]


def _matmul_function(op: str, weight_nodes: list, inputs: list[str], attributes: list[str], opset: int,
                     doc: str) -> onnx.FunctionProto:
    """A function body ``Y = X Wᵀ`` where ``weight_nodes`` compute ``w`` [N, K] from ``inputs``."""
    nodes = weight_nodes + [
        helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["X", "w_t"], ["Y"]),
    ]
    return helper.make_function(DOMAIN, op, ["X", *inputs], ["Y"], nodes,
                                opset_imports=[helper.make_opsetid("", opset)], attributes=attributes, doc_string=doc)


def _gather_function(op: str, tables: list[tuple[str, int]], weight_nodes: list, attributes: list[str], opset: int,
                     doc: str) -> onnx.FunctionProto:
    """A function body ``Y = W[indices]`` that gathers the rows of each packed table first
    (``tables``: (name, row axis); input ``table_<name>`` gathered into ``<name>``), so that
    ``weight_nodes`` reconstruct only those rows (``w`` [R, K])."""
    nodes = [
        _const("flat", np.array([-1], np.int64), TensorProto.INT64),
        helper.make_node("Reshape", ["indices", "flat"], ["rows"]),
        *(helper.make_node("Gather", [f"table_{t}", "rows"], [t], axis=axis) for t, axis in tables),
        *weight_nodes,
        helper.make_node("Shape", ["indices"], ["idx_shape"]),
        helper.make_node("Concat", ["idx_shape", "k_1"], ["y_shape"], axis=0),
        helper.make_node("Reshape", ["w", "y_shape"], ["Y"]),
    ]
    return helper.make_function(DOMAIN, op, ["indices", *(f"table_{t}" for t, _ in tables)], ["Y"], nodes,
                                opset_imports=[helper.make_opsetid("", opset)], attributes=attributes, doc_string=doc)


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
)


# -- BcqGather ------------------------------------------------------------------------------------
#
# ``Y = Ŵ[indices]``: rows of a BcqMatMul weight, i.e. an embedding lookup on a quantized table. A
# decoder whose LM head is tied to its embedding stores one copy: the head's BcqMatMul and the
# embedding's BcqGather read the same ``planes`` and ``exps`` initializers (the shift-add pass).
#
# inputs
#     indices  int64   [...]                 row numbers in [-N, N) (negative: from the end, as Gather)
#     planes   uint32  [q, N, ceil(K/32)]    as BcqMatMul
#     exps     int8    [q, N, ceil(K/G), T]  as BcqMatMul
# attributes: bits, group_size, in_features, coding — as BcqMatMul
# output
#     Y        float32 [..., K]


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
    _check_bcq_body("BcqGather", opset, coding)
    return _gather_function("BcqGather", [("planes", 1), ("exps", 1)], _bcq_weight_nodes(), _BCQ_BODY_ATTRS, opset,
                            "Y = W[indices], W = sum_i alpha_i * (2 B_i - 1); see shiftc/passes/ops.py")


BCQ_GATHER = BCQ_MATMUL.gather("BcqGather", bcq_gather_function, bcq_gather_ref)


# -- QGather --------------------------------------------------------------------------------------
#
# ``Y = Ŵ[indices]``, ``Ŵ[n, k] = scales[n, g]·c[n, k] + mins[n, g]`` (g = k / G): an embedding table
# on a uniform asymmetric grid of 2^q levels per group of G columns (the table of its own that the
# shift-add pass gives a token embedding; math in shiftc/passes/uniform.py).
#
# inputs
#     indices  int64   [...]                  row numbers in [-N, N)
#     codes    uint8   [N, ceil(K·q/8)]       code k of a row in bits (k·q) % 8 .. of byte k·q/8, low bits first
#     scales   float16 [N, ceil(K/G)]
#     mins     float16 [N, ceil(K/G)]
# attributes: bits (q: 2, 4 or 8), group_size (G), in_features (K)
# output
#     Y        float32 [..., K]
# Effectively q + 32/G bits per weight (q = 4, G = 32: 5).


def qgather_weight(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, *, bits: int, group_size: int,
                   in_features: int, **_) -> np.ndarray:
    """Ŵ [N, K] float32 of a QGather table."""
    from .uniform import dequantize

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
        _const("flat", np.array([-1], np.int64), i64),
        _const("ax_last", np.array([-1], np.int64), i64),
        _const("ax_0", np.array([0], np.int64), i64),
        _const("zero_i", np.array([0], np.int64), i64),
        _const("zero_s", np.array(0, np.int64), i64),
        _const("eight", np.array(8, np.int64), i64),
        _const("shape_r_", np.array([0, -1], np.int64), i64),
        _attr_const("q_scalar", "bits"),
        _attr_const("k_scalar", "in_features"),
        _attr_const("g_scalar", "group_size"),
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
        _const("ones2", np.array([1, 1], np.int64), i64),
        helper.make_node("Concat", ["ones2", "g_1"], ["g_shape"], axis=0),
        helper.make_node("Cast", ["scales16"], ["s_f"], to=f32),
        helper.make_node("Unsqueeze", ["s_f", "ax_last"], ["s3"]),
        helper.make_node("Expand", ["s3", "g_shape"], ["s_g"]),
        helper.make_node("Reshape", ["s_g", "shape_r_"], ["s_flat"]),
        helper.make_node("Slice", ["s_flat", "zero_i", "k_1", "ax_last"], ["s_k"]),
        helper.make_node("Cast", ["mins16"], ["m_f"], to=f32),
        helper.make_node("Unsqueeze", ["m_f", "ax_last"], ["m3"]),
        helper.make_node("Expand", ["m3", "g_shape"], ["m_g"]),
        helper.make_node("Reshape", ["m_g", "shape_r_"], ["m_flat"]),
        helper.make_node("Slice", ["m_flat", "zero_i", "k_1", "ax_last"], ["m_k"]),
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
        doc_string="Y = W[indices], W = scales * codes + mins per group; see shiftc/passes/ops.py",
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
)

#: op name -> spec; the one table of shiftc's ops (domain :data:`DOMAIN`).
OPS: dict[str, OpSpec] = {BCQ_MATMUL.name: BCQ_MATMUL, BCQ_GATHER.name: BCQ_GATHER, Q_GATHER.name: Q_GATHER}


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


# -- FdbMatMul ------------------------------------------------------------------------------------
#
# ``Y = X · Ŵᵀ``,  ``Ŵ [N, K] = Σ_{i<q} α_i ⊙ B_i + μ``,  B_i ∈ {0, 1}, α and μ broadcast over groups
# of G columns (the binarization pass, shiftc/passes/binarize.py; math in shiftc/passes/fdb.py).
#
# inputs
#     X        float32 [..., K]
#     planes   uint32  [q, N, ceil(K/32)]   same bit layout as BcqMatMul (packed.h), padding bits zero
#     scales   float16 [q, N, ceil(K/G)]    α_i, any sign
#     offsets  float16 [N, ceil(K/G)]       μ
# attributes
#     bits  (q, 1..4; the pass writes 2 for "fdb" and 1 for "1bit"), group_size (G, a multiple
#     of 32), in_features (K)
# output
#     Y        float32 [..., N]
# As with BcqMatMul there is no bias input: a Gemm's C stays a standard Add after the op.


def fdb_matmul_weight(planes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, *, group_size: int,
                      in_features: int, **_) -> np.ndarray:
    """Ŵ [N, K] float32 of an FdbMatMul."""
    from .fdb import reconstruct as fdb_reconstruct

    return fdb_reconstruct(unpack_planes(planes, in_features), scales, offsets, group_size)


def fdb_matmul_ref(x: np.ndarray, planes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, *, bits: int,
                   group_size: int, in_features: int, bias: np.ndarray | None = None) -> np.ndarray:
    """numpy reference of FdbMatMul: ``X Ŵᵀ (+ bias)``, accumulated in float64, returned as float32."""
    if planes.shape[0] != bits or scales.shape[0] != bits:
        raise ValueError(f"bits={bits} but planes {planes.shape} / scales {scales.shape}")
    w = fdb_matmul_weight(planes, scales, offsets, group_size=group_size, in_features=in_features)
    y = np.asarray(x, np.float64) @ w.astype(np.float64).T
    if bias is not None:
        y = y + bias
    return y.astype(np.float32)


def fdb_matmul_function(opset: int) -> onnx.FunctionProto:
    """The ONNX function body of ``ai.shiftc::FdbMatMul`` for a model of default-domain ``opset``."""
    if opset < MIN_OPSET:
        raise ValueError(f"FdbMatMul's function body needs opset >= {MIN_OPSET}, got {opset}")

    const = _const
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = _plane_bit_nodes() + [  # b_f: {0,1} coding, the bit is the factor
        const("shape_n_", np.array([0, -1], np.int64), i64),
        # scales [q,N,ng] -> [q,N,ng,G] -> [q,N,ng*G] -> [:K]; offsets likewise with one axis less
        helper.make_node("Cast", ["scales"], ["alpha"], to=f32),
        helper.make_node("Unsqueeze", ["alpha", "ax_last"], ["alpha4"]),
        const("ones3", np.array([1, 1, 1], np.int64), i64),
        helper.make_node("Concat", ["ones3", "g_1"], ["g_shape"], axis=0),
        helper.make_node("Expand", ["alpha4", "g_shape"], ["alpha_g"]),
        helper.make_node("Reshape", ["alpha_g", "shape_qn_"], ["alpha_flat"]),
        helper.make_node("Slice", ["alpha_flat", "zero_i", "k_1", "ax_last"], ["alpha_k"]),
        helper.make_node("Cast", ["offsets"], ["mu"], to=f32),
        helper.make_node("Unsqueeze", ["mu", "ax_last"], ["mu3"]),
        const("ones2", np.array([1, 1], np.int64), i64),
        helper.make_node("Concat", ["ones2", "g_1"], ["g_shape2"], axis=0),
        helper.make_node("Expand", ["mu3", "g_shape2"], ["mu_g"]),
        helper.make_node("Reshape", ["mu_g", "shape_n_"], ["mu_flat"]),
        helper.make_node("Slice", ["mu_flat", "zero_i", "k_1", "ax_last"], ["mu_k"]),
        # W [N,K] = sum_i alpha_i * b_i + mu
        helper.make_node("Mul", ["alpha_k", "b_f"], ["planes_w"]),
        helper.make_node("ReduceSum", ["planes_w", "ax_0"], ["w_planes"], keepdims=0),
        helper.make_node("Add", ["w_planes", "mu_k"], ["w"]),
    ]
    return _matmul_function("FdbMatMul", nodes, ["planes", "scales", "offsets"], ["bits", "group_size", "in_features"],
                            opset, "Y = X W^T, W = sum_i alpha_i * B_i + mu (B in {0,1}); see shiftc/passes/ops.py")


FDB_MATMUL = OpSpec(
    name="FdbMatMul",
    inputs=(("X", "float32 [..., K]"), ("planes", "uint32 [q, N, ceil(K/32)]"),
            ("scales", "float16 [q, N, ceil(K/G)]"), ("offsets", "float16 [N, ceil(K/G)]")),
    outputs=(("Y", "float32 [..., N]"),),
    attributes=(("bits", "int: q, 1..4"), ("group_size", "int: G, multiple of 32"), ("in_features", "int: K")),
    function=fdb_matmul_function,
    reference=fdb_matmul_ref,
    weight=fdb_matmul_weight,
)
OPS[FDB_MATMUL.name] = FDB_MATMUL


# -- UniformMatMul / UniformGather ----------------------------------------------------------------
#
# ``Y = X · Ŵᵀ``,  ``Ŵ[n, k] = mins[n, g] + scales[n, g] · Σ_{i<q} 2^i·B_i[n, k]``,  B_i ∈ {0, 1}: a q-bit
# uniform grid per group of G columns, written as q binary planes whose scales are a shift apart
# (the shift-add pass's scale_mode "uniform"; math in shiftc/passes/uniform.py).
#
# inputs
#     X        float32 [..., K]
#     planes   uint32  [q, N, ceil(K/32)]   bit i of weight (n, k)'s code, layout as BcqMatMul (packed.h)
#     scales   float16 [N, ceil(K/G)]
#     mins     float16 [N, ceil(K/G)]
# attributes: bits (q, 1..4), group_size (G, a multiple of 32), in_features (K)
# output
#     Y        float32 [..., N]
# Stored bits per weight: q + 32/G (q = 4, G = 32: 5). UniformGather(indices, planes, scales, mins)
# reads rows of the same weight: the embedding lookup of a tied LM head, one copy in the model.


def uniform_matmul_weight(planes: np.ndarray, scales: np.ndarray, mins: np.ndarray, *, group_size: int,
                          in_features: int, **_) -> np.ndarray:
    """Ŵ [N, K] float32 of an UniformMatMul / UniformGather."""
    from .uniform import grid_weight

    return grid_weight(planes_to_codes(planes, in_features), scales, mins, group_size)


def uniform_matmul_ref(x: np.ndarray, planes: np.ndarray, scales: np.ndarray, mins: np.ndarray, *, bits: int,
                       group_size: int, in_features: int, bias: np.ndarray | None = None) -> np.ndarray:
    """numpy reference of UniformMatMul: ``X Ŵᵀ (+ bias)``, accumulated in float64, returned as float32."""
    if planes.shape[0] != bits:
        raise ValueError(f"bits={bits} but planes {planes.shape}")
    w = uniform_matmul_weight(planes, scales, mins, group_size=group_size, in_features=in_features)
    y = np.asarray(x, np.float64) @ w.astype(np.float64).T
    if bias is not None:
        y = y + bias
    return y.astype(np.float32)


def uniform_gather_ref(indices: np.ndarray, planes: np.ndarray, scales: np.ndarray, mins: np.ndarray, *, bits: int,
                       group_size: int, in_features: int) -> np.ndarray:
    """numpy reference of UniformGather: rows ``indices`` of Ŵ."""
    if planes.shape[0] != bits:
        raise ValueError(f"bits={bits} but planes {planes.shape}")
    w = uniform_matmul_weight(planes, scales, mins, group_size=group_size, in_features=in_features)
    return w[np.asarray(indices, np.int64)]


def _uniform_weight_nodes() -> list[onnx.NodeProto]:
    """Function-body nodes reading ``planes`` [q,N,W], ``scales`` and ``mins`` [N,ng] (float16) and
    writing ``w`` = Ŵ [N, K] float32 (attributes ``in_features``, ``group_size`` read), ``k_1``."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    const = _const
    nodes = _plane_bit_nodes() + [
        const("zero_s", np.array(0, np.int64), i64),
        const("one_s", np.array(1, np.int64), i64),
        const("shape_n_", np.array([0, -1], np.int64), i64),
        const("shape_q11", np.array([-1, 1, 1], np.int64), i64),
        const("two", np.array(2.0, np.float32), f32),
        _attr_const("q_scalar", "bits"),
        # codes [N,K] = sum_i 2^i b_i
        helper.make_node("Range", ["zero_s", "q_scalar", "one_s"], ["plane_i"]),
        helper.make_node("Cast", ["plane_i"], ["plane_f"], to=f32),
        helper.make_node("Pow", ["two", "plane_f"], ["pow2"]),
        helper.make_node("Reshape", ["pow2", "shape_q11"], ["pow2_q11"]),
        helper.make_node("Mul", ["b_f", "pow2_q11"], ["b_w"]),
        helper.make_node("ReduceSum", ["b_w", "ax_0"], ["codes"], keepdims=0),
        # scales and mins [N,ng] -> [N,ng,G] -> [N,ng*G] -> [:K]
        const("ones2", np.array([1, 1], np.int64), i64),
        helper.make_node("Concat", ["ones2", "g_1"], ["g_shape"], axis=0),
    ]
    for src, dst in (("scales", "s_k"), ("mins", "m_k")):
        nodes += [
            helper.make_node("Cast", [src], [f"{dst}_f"], to=f32),
            helper.make_node("Unsqueeze", [f"{dst}_f", "ax_last"], [f"{dst}_3"]),
            helper.make_node("Expand", [f"{dst}_3", "g_shape"], [f"{dst}_g"]),
            helper.make_node("Reshape", [f"{dst}_g", "shape_n_"], [f"{dst}_flat"]),
            helper.make_node("Slice", [f"{dst}_flat", "zero_i", "k_1", "ax_last"], [dst]),
        ]
    nodes += [helper.make_node("Mul", ["codes", "s_k"], ["cs"]), helper.make_node("Add", ["cs", "m_k"], ["w"])]
    return nodes


def uniform_matmul_function(opset: int) -> onnx.FunctionProto:
    """The ONNX function body of ``ai.shiftc::UniformMatMul`` for a model of default-domain ``opset``."""
    if opset < MIN_OPSET:
        raise ValueError(f"UniformMatMul's function body needs opset >= {MIN_OPSET}, got {opset}")
    return _matmul_function("UniformMatMul", _uniform_weight_nodes(), ["planes", "scales", "mins"],
                            ["bits", "group_size", "in_features"], opset,
                            "Y = X W^T, W = mins + scales * sum_i 2^i B_i (B in {0,1}); see shiftc/passes/ops.py")


def uniform_gather_function(opset: int) -> onnx.FunctionProto:
    """The ONNX function body of ``ai.shiftc::UniformGather``: rows gathered first, then unpacked."""
    if opset < MIN_OPSET:
        raise ValueError(f"UniformGather's function body needs opset >= {MIN_OPSET}, got {opset}")
    return _gather_function("UniformGather", [("planes", 1), ("scales", 0), ("mins", 0)], _uniform_weight_nodes(),
                            ["bits", "group_size", "in_features"], opset,
                            "Y = W[indices], W = mins + scales * sum_i 2^i B_i; see shiftc/passes/ops.py")


_UNIFORM_ATTRS = (("bits", "int: q, 1..4"), ("group_size", "int: G, multiple of 32"), ("in_features", "int: K"))
UNIFORM_MATMUL = OpSpec(
    name="UniformMatMul",
    inputs=(("X", "float32 [..., K]"), ("planes", "uint32 [q, N, ceil(K/32)]"),
            ("scales", "float16 [N, ceil(K/G)]"), ("mins", "float16 [N, ceil(K/G)]")),
    outputs=(("Y", "float32 [..., N]"),),
    attributes=_UNIFORM_ATTRS,
    function=uniform_matmul_function,
    reference=uniform_matmul_ref,
    weight=uniform_matmul_weight,
)
UNIFORM_GATHER = UNIFORM_MATMUL.gather("UniformGather", uniform_gather_function, uniform_gather_ref)
OPS[UNIFORM_MATMUL.name] = UNIFORM_MATMUL
OPS[UNIFORM_GATHER.name] = UNIFORM_GATHER


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

    from .shiftadd import _remove_dead

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
    _remove_dead(out.graph)
    return out
