"""Importance of each unit of a group (math only: numpy on weights and activation norms).

For every layer weight W of the group (MatMul/Gemm B, Conv W) the elementwise importance is

    magnitude    I = W²
    activation   I = |W| · ‖X_k‖₂       (Wanda: X_k the input channel k that W's entry multiplies,
                                          norms from calibration, :mod:`.calib`)
    lorapr       I = |G ⊙ (W + BA)|     (LoRAPrune; scores computed in torch, passed in per weight)

I is summed over the unit's slice of W (a column block for the producing layer, a row block for
the consuming one), divided by its mean over the group's units (so a large layer does not drown a
small one), and summed over the layers of the group. Lower = pruned first.
"""

from __future__ import annotations

import numpy as np

CRITERIA = ("activation", "magnitude", "lorapr")


def layer_inputs(info) -> dict[str, tuple]:
    """{weight: (node, input axis of W, activation tensor, its channel axis)} for every layer."""
    out = {}
    for node, w, _ in info.compute_weights():
        rank = len(info.shapes[w])
        if node.op_type == "MatMul":
            out[w] = (node, rank - 2, node.input[0], len(info.shapes[node.input[0]] or [0, 0]) - 1)
        elif node.op_type == "Gemm":
            tb = next((a.i for a in node.attribute if a.name == "transB"), 0)
            out[w] = (node, 1 if tb else 0, node.input[0], 1)
        else:  # Conv
            out[w] = (node, 1, node.input[0], 1)
    return out


def _xnorm_for(w: np.ndarray, node, in_axis: int, xnorm: np.ndarray) -> np.ndarray:
    """‖X_k‖ broadcast to W's shape (grouped Conv: output channel o reads inputs of its group)."""
    if node.op_type == "Conv":
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        m, cg = w.shape[:2]
        g_of = np.arange(m) // (m // groups)
        full = xnorm[(g_of[:, None] * cg + np.arange(cg)[None, :])]  # [M, C/g]
        return full.reshape(full.shape + (1,) * (w.ndim - 2))
    shape = [1] * w.ndim
    shape[in_axis] = w.shape[in_axis]
    return xnorm.reshape(shape)


def importance(w: np.ndarray, criterion: str, *, node=None, in_axis: int = 0, xnorm: np.ndarray | None = None,
               score: np.ndarray | None = None) -> np.ndarray:
    """Elementwise importance of weight ``w`` (same shape)."""
    if criterion == "magnitude":
        return np.square(w, dtype=np.float64)
    if criterion == "activation":
        return np.abs(w, dtype=np.float64) * _xnorm_for(w, node, in_axis, xnorm)
    if criterion == "lorapr":
        return np.asarray(score, np.float64)
    raise ValueError(criterion)


def unit_scores(group, info, criterion: str, *, norms: dict | None = None, scores: dict | None = None) -> np.ndarray:
    """Score per unit of ``group`` (float64 [units]); see the module docstring."""
    layers = layer_inputs(info)
    total = np.zeros(group.units)
    for d in group.weights:
        if d.tensor not in layers:
            continue
        node, in_axis, x, _ = layers[d.tensor]
        # lorapr scores come per weight: the weight itself is not read (no copy of a large model)
        w = info.const(d.tensor) if criterion != "lorapr" else None
        imp = importance(w, criterion, node=node, in_axis=in_axis, xnorm=(norms or {}).get(x),
                         score=(scores or {}).get(d.tensor))
        per_elem = np.moveaxis(imp, d.axis, 0).reshape(imp.shape[d.axis], -1).sum(axis=1)
        s = np.bincount(d.unit, weights=per_elem[d.idx], minlength=group.units)
        mean = s.mean()
        total += s / mean if mean > 0 else s
    return total


def compensate_bias(model, info, plan, means: dict):
    """Copy of ``model`` where each Conv/Gemm that loses input channels c keeps their mean effect.

    A removed input channel's activation is replaced by its calibration mean μ_c (instead of 0):
    b_o += Σ_c Σ_spatial W[o, c, ...] · μ_c, added to the layer's existing bias initializer
    (layers without one are left as they are). Exact for channels that are constant, e.g. a
    ReLU6 of a folded BatchNorm bias whose conv weights were pruned away.
    """
    import onnx
    from onnx import numpy_helper

    layers = layer_inputs(info)
    delta: dict[str, np.ndarray] = {}
    for group, units in plan:
        if len(units) == 0:
            continue
        for d in group.weights:
            if d.tensor not in layers:
                continue
            node, in_axis, x, _ = layers[d.tensor]
            groups_attr = next((a.i for a in node.attribute if a.name == "group"), 1)
            if node.op_type not in ("Conv", "Gemm") or d.axis != in_axis or groups_attr != 1 or x not in means:
                continue
            bias = node.input[2] if len(node.input) > 2 else ""
            if bias not in info.inits:
                continue
            rm = np.sort(d.idx[np.isin(d.unit, units)])
            w = info.const(d.tensor).astype(np.float64)
            wk = np.moveaxis(w, in_axis, 0)[rm]  # [removed, out, ...]
            wk = wk.reshape(len(rm), wk.shape[1], -1).sum(axis=2)  # spatial taps summed
            delta[bias] = delta.get(bias, 0) + means[x][rm] @ wk
    if not delta:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in delta:
            b = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((b + delta[t.name]).astype(b.dtype), t.name))
    return out
