"""What every ``ai.shiftc`` op record holds (:class:`OpSpec`), the domain, and the pieces of ONNX
function bodies the ops share (constants, bit-plane unpacking, the matmul and gather frames)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from dataclasses import dataclass
from typing import Callable

DOMAIN = "ai.shiftc"
DOMAIN_VERSION = 1
MIN_OPSET = 13


@dataclass(frozen=True)
class OpSpec:
    """One op: its schema, function body, numpy reference and weight reconstruction, and what the
    passes write for it (initializer name suffixes, plane coding); the backend registers its
    lowering under ``name`` (shiftc/backend/shiftc_ops.py; tests check every op has one)."""

    name: str
    inputs: tuple[tuple[str, str], ...]  # (name, "dtype [shape]")
    outputs: tuple[tuple[str, str], ...]
    attributes: tuple[tuple[str, str], ...]  # (name, "type: meaning")
    function: Callable[[int], onnx.FunctionProto]  # opset -> function body
    reference: Callable[..., np.ndarray]  # numpy reference
    weight: Callable[..., np.ndarray]  # (constant inputs after X, **attributes) -> Ŵ [N, K] float32
    kind: str = "matmul"  # "matmul": Y = X Ŵᵀ; "gather": Y = Ŵ[indices] (X holds the indices)
    initializers: tuple[str, ...] = ()  # suffixes of the weight initializers the passes write (<layer><suffix>)
    coding: str | None = None  # bit planes: "pm1" (±1) or "01" ({0,1}); None: no planes

    def gather(self, name: str, function, reference) -> "OpSpec":
        """The op reading the rows of this matmul op's weight: the same weight inputs after ``indices``."""
        return OpSpec(name=name, inputs=(("indices", "int64 [...]"), *self.inputs[1:]),
                      outputs=(("Y", "float32 [..., K]"),), attributes=self.attributes, function=function,
                      reference=reference, weight=self.weight, kind="gather", initializers=self.initializers,
                      coding=self.coding)


def const(name, value, dtype):
    """A Constant node ``name`` holding ``value``."""
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, np.shape(value), np.ravel(value).tolist()))


def attr_const(name, attr):
    """A Constant node ``name`` holding the int attribute ``attr`` of the function."""
    n = helper.make_node("Constant", [], [name])
    n.attribute.append(onnx.AttributeProto(name="value_int", ref_attr_name=attr, type=onnx.AttributeProto.INT))
    return n


def plane_bit_nodes() -> list[onnx.NodeProto]:
    """Function-body nodes unpacking ``planes`` uint32 [q,N,W] into ``b_f`` float32 0/1 [q,N,K]
    (two shifts per bit, padding columns sliced off), with the constants the bodies share:
    ``ax_last``, ``ax_0``, ``zero_i``, ``shape_qn_`` and ``k_1``, ``g_1`` (attributes ``in_features``,
    ``group_size`` as 1-D tensors)."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
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



def matmul_function(op: str, weight_nodes: list, inputs: list[str], attributes: list[str], opset: int,
                     doc: str) -> onnx.FunctionProto:
    """A function body ``Y = X Wᵀ`` where ``weight_nodes`` compute ``w`` [N, K] from ``inputs``."""
    nodes = weight_nodes + [
        helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["X", "w_t"], ["Y"]),
    ]
    return helper.make_function(DOMAIN, op, ["X", *inputs], ["Y"], nodes,
                                opset_imports=[helper.make_opsetid("", opset)], attributes=attributes, doc_string=doc)


def gather_function(op: str, tables: list[tuple[str, int]], weight_nodes: list, attributes: list[str], opset: int,
                     doc: str) -> onnx.FunctionProto:
    """A function body ``Y = W[indices]`` that gathers the rows of each packed table first
    (``tables``: (name, row axis); input ``table_<name>`` gathered into ``<name>``), so that
    ``weight_nodes`` reconstruct only those rows (``w`` [R, K])."""
    nodes = [
        const("flat", np.array([-1], np.int64), TensorProto.INT64),
        helper.make_node("Reshape", ["indices", "flat"], ["rows"]),
        *(helper.make_node("Gather", [f"table_{t}", "rows"], [t], axis=axis) for t, axis in tables),
        *weight_nodes,
        helper.make_node("Shape", ["indices"], ["idx_shape"]),
        helper.make_node("Concat", ["idx_shape", "k_1"], ["y_shape"], axis=0),
        helper.make_node("Reshape", ["w", "y_shape"], ["Y"]),
    ]
    return helper.make_function(DOMAIN, op, ["indices", *(f"table_{t}" for t, _ in tables)], ["Y"], nodes,
                                opset_imports=[helper.make_opsetid("", opset)], attributes=attributes, doc_string=doc)



def group_broadcast(src: str, dst: str, rank: int, flat_shape: str, *, cast: bool = False) -> list[onnx.NodeProto]:
    """Function-body nodes spreading ``src`` [..., ng] (``rank`` axes; float16 with ``cast``) over
    its G columns into ``dst`` [..., K] float32: unsqueeze, expand to G, reshape by the constant
    ``flat_shape``, slice the first K (needs ``g_1``, ``k_1``, ``zero_i``, ``ax_last``)."""
    x = src
    nodes = []
    if cast:
        x = f"{dst}_f"
        nodes.append(helper.make_node("Cast", [src], [x], to=TensorProto.FLOAT))
    return nodes + [
        helper.make_node("Unsqueeze", [x, "ax_last"], [f"{dst}_u"]),
        const(f"{dst}_ones", np.ones(rank, np.int64), TensorProto.INT64),
        helper.make_node("Concat", [f"{dst}_ones", "g_1"], [f"{dst}_gshape"], axis=0),
        helper.make_node("Expand", [f"{dst}_u", f"{dst}_gshape"], [f"{dst}_g"]),
        helper.make_node("Reshape", [f"{dst}_g", flat_shape], [f"{dst}_flat"]),
        helper.make_node("Slice", [f"{dst}_flat", "zero_i", "k_1", "ax_last"], [dst]),
    ]


def matmul_ref(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``X Ŵᵀ (+ bias)`` accumulated in float64, returned as float32: the matmul ops' references."""
    y = np.asarray(x, np.float64) @ w.astype(np.float64).T
    if bias is not None:
        y = y + bias
    return y.astype(np.float32)
