"""N:M semi-structured sparsity (2:4, 4:8): zeros in the weights plus a record in the metadata.

For every MatMul/Gemm weight W [K, N] (K = input axis) and each block of M consecutive input
channels of one output column, the N entries with the largest score are kept and the others set
to zero; a dense convolution's weight [Cout, Cin, KH, KW] likewise in blocks of M input channels
per output channel and kernel tap. Score: ``|W_kn| · ‖X_k‖₂`` (activation-aware, Wanda) when calibration norms of the layer's
input are given, else ``|W_kn|``. The graph is unchanged apart from the weight values, so any
backend runs it densely; ``shiftc.sparsity`` in the metadata lists the layers and the pattern so a
backend with a sparse kernel can use it.

Storage a sparse kernel would read: N/M of the values plus ⌈log2 M⌉ index bits each, i.e.
(N/M)·(32 + ⌈log2 M⌉) bits per fp32 weight — 17 for 2:4, 17.5 for 4:8, against 32 dense.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
from onnx import numpy_helper

from ...errors import UsageError
from ..graph import attrs


def parse_pattern(pattern: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in str(pattern).split(":"))
    except ValueError:
        raise UsageError(f"--nm must look like N:M (2:4, 4:8), got {pattern!r}") from None
    if not 0 < n < m or m > 64:
        raise UsageError(f"--nm {pattern}: need 0 < N < M <= 64")
    return n, m


def nm_mask(score: np.ndarray, n: int, m: int) -> np.ndarray:
    """Boolean mask [K, N] keeping the n largest scores of each block of m rows, per column."""
    k, cols = score.shape
    blocks = score.reshape(k // m, m, cols)
    order = np.argsort(-blocks, axis=1, kind="stable")
    keep = np.zeros_like(blocks, bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return keep.reshape(k, cols)


def weight_mask(score: np.ndarray, in_axis: int, n: int, m: int) -> np.ndarray:
    """N:M mask of a weight of any rank (a MatMul/Gemm [K, N] or [N, K], a Conv [Cout, Cin, KH, KW]):
    blocks of m consecutive entries along its input axis ``in_axis`` (a convolution's input
    channels, per output channel and kernel tap), the n largest scores of each kept."""
    moved = np.moveaxis(score, in_axis, 0)
    mask = nm_mask(moved.reshape(moved.shape[0], -1), n, m).reshape(moved.shape)
    return np.moveaxis(mask, 0, in_axis)


def ineligible(node: onnx.NodeProto, arr: np.ndarray, in_axis: int, m: int) -> str | None:
    """Why N:M does not apply to the weight ``arr`` of ``node`` (None: it does)."""
    if node.op_type == "Conv" and (arr.ndim != 4 or attrs(node).get("group", 1) != 1):
        return "grouped / depthwise convolution"
    if arr.ndim not in (2, 4) or arr.shape[in_axis] % m:
        return f"input width {arr.shape[in_axis]} is not a multiple of {m}"
    return None


def nm_layers(info, m: int) -> dict[str, int]:
    """{weight: input axis} of every layer N:M applies to (skip globs aside)."""
    from .criteria import layer_inputs

    return {w: axis for w, (node, axis, _, _) in layer_inputs(info).items()
            if ineligible(node, info.const(w), axis, m) is None}


def apply_nm(model: onnx.ModelProto, pattern: str, *, norms: dict | None = None, info=None,
             skip: tuple = ()) -> tuple[onnx.ModelProto, dict]:
    """Return (a copy of ``model`` with N:M zeros in its MatMul/Gemm/Conv weights, report)."""
    import fnmatch

    from .criteria import layer_inputs
    from .groups import GraphInfo

    n, m = parse_pattern(pattern)
    info = info or GraphInfo(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    layers, skipped = [], []
    for w, (node, in_axis, x, _) in layer_inputs(info).items():
        if any(fnmatch.fnmatch(w, p) for p in skip):
            skipped.append({"layer": w, "reason": "matches skip"})
            continue
        arr = info.const(w)
        reason = ineligible(node, arr, in_axis, m)
        if reason:
            skipped.append({"layer": w, "reason": reason})
            continue
        score = np.abs(arr, dtype=np.float64)
        if norms is not None and x in norms:
            score = score * np.expand_dims(norms[x], [a for a in range(arr.ndim) if a != in_axis])
        new = np.where(weight_mask(score, in_axis, n, m), arr, 0).astype(arr.dtype)
        inits[w].CopyFrom(numpy_helper.from_array(new, w))
        layers.append(w)
    bits = n / m * (32 + math.ceil(math.log2(m)))
    record = {"pattern": f"{n}:{m}", "axis": "input", "criterion": "activation" if norms else "magnitude",
              "layers": layers}
    props = {p.key: p.value for p in out.metadata_props}
    props["shiftc.sparsity"] = json.dumps(record)
    del out.metadata_props[:]
    for k, v in props.items():
        out.metadata_props.add(key=k, value=v)
    report = {**record, "skipped": skipped, "sparse_bits_per_weight": round(bits, 2), "dense_bits_per_weight": 32,
              "sparse_kernel": ("not built: the compiled model runs the zeros densely (same speed as dense). "
                                f"A {n}:{m} kernel would read {bits:.1f} instead of 32 bits per weight, at most "
                                f"{32 / bits:.2f}x less weight traffic for memory-bound decode, minus index decoding "
                                "and gathers of the activations; see docs/architecture.md")}
    return out, report
