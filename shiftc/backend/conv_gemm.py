"""Convolutions as matrix products (a backend-private ONNX rewrite for CPU targets).

TVM lowers ``Conv`` to a direct loop nest — per output pixel, a sum over input channels and the
kernel window — which no shiftc schedule rule turns into fast code: the Fashion-MNIST ResNet ran
20–60× slower than ONNX Runtime that way. The matrix-product rule, on the other hand, is
register-blocked and packs its weight (schedules/matmul.py). :func:`rewrite` therefore writes each
dense 2-D convolution (``group`` 1, constant weight, static spatial size) as im2col + MatMul in
standard ONNX:

    x [B, C, H, W] → Pad → one strided Slice per kernel tap (kh, kw) → Concat on channels
      → [B, KH·KW·C, Ho, Wo] → Transpose → [B, Ho, Wo, KH·KW·C]
      → MatMul W' [KH·KW·C, Cout] (+ bias) → [B, Ho, Wo, Cout] → Transpose → [B, Cout, Ho, Wo]

with W'[(kh·KW + kw)·C + c, o] = W[o, c, kh, kw]. A 1×1 convolution of stride 1 skips the slices.
The products and sums are the convolution's, in another order (float32 re-association only).
Grouped and depthwise convolutions stay as they are (little arithmetic per byte: the direct loop
suits them). The ONNX file is not changed: this runs on the graph the compiler imports.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from ..passes.graph import attrs


def _static_hw(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Tensor name -> (H, W) where shape inference knows a 4-D tensor's spatial size."""
    inferred = shape_inference.infer_shapes(model, strict_mode=False)
    out = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
            out[vi.name] = (dims[2].dim_value, dims[3].dim_value)
    return out


def _plan(node: onnx.NodeProto, weights: dict, hw: dict) -> dict | None:
    """The geometry of a convolution the rewrite takes, else None."""
    if node.op_type != "Conv" or node.input[1] not in weights or node.input[0] not in hw:
        return None
    w = weights[node.input[1]]
    a = attrs(node)
    if w.ndim != 4 or a.get("group", 1) != 1 or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    if any(d != 1 for d in a.get("dilations", [1, 1])):
        return None
    (kh, kw), (sh, sw) = w.shape[2:], a.get("strides", [1, 1])
    pt, pl, pb, pr = a.get("pads", [0, 0, 0, 0])
    h, wd = hw[node.input[0]]
    ho, wo = (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1
    return {"k": (kh, kw), "s": (sh, sw), "pads": (pt, pl, pb, pr), "out": (ho, wo)}


def _nodes(node: onnx.NodeProto, plan: dict, w: np.ndarray, name: str) -> tuple[list, list]:
    """The im2col + MatMul nodes replacing ``node`` and their new initializers."""
    cout, c, kh, kw = w.shape
    (sh, sw), (ho, wo), pads = plan["s"], plan["out"], plan["pads"]
    nodes, inits = [], []

    def const(suffix, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), f"{name}/const_{suffix}"))
        return f"{name}/const_{suffix}"

    x = node.input[0]
    if any(pads):
        pt, pl, pb, pr = pads
        nodes.append(helper.make_node("Pad", [x, const("pads", np.array([0, 0, pt, pl, 0, 0, pb, pr], np.int64))],
                                      [f"{name}/padded"]))
        x = f"{name}/padded"
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        cols = x
    else:
        taps, axes, steps = [], const("axes", np.array([2, 3], np.int64)), const("steps", np.array([sh, sw], np.int64))
        for i in range(kh):
            for j in range(kw):
                out = f"{name}/tap{i}_{j}"
                nodes.append(helper.make_node("Slice", [x, const(f"st{i}_{j}", np.array([i, j], np.int64)),
                                                        const(f"en{i}_{j}", np.array([i + sh * (ho - 1) + 1,
                                                                                      j + sw * (wo - 1) + 1], np.int64)),
                                                        axes, steps], [out]))
                taps.append(out)
        cols = f"{name}/cols"
        nodes.append(helper.make_node("Concat", taps, [cols], axis=1))
    wm = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(kh * kw * c, cout)).astype(np.float32)
    nodes += [helper.make_node("Transpose", [cols], [f"{name}/nhwc"], perm=[0, 2, 3, 1]),
              helper.make_node("MatMul", [f"{name}/nhwc", const("weight", wm)], [f"{name}/mm"])]
    y = f"{name}/mm"
    if len(node.input) > 2 and node.input[2]:
        nodes.append(helper.make_node("Add", [y, node.input[2]], [f"{name}/biased"]))
        y = f"{name}/biased"
    nodes.append(helper.make_node("Transpose", [y], [node.output[0]], perm=[0, 3, 1, 2]))
    return nodes, inits


def rewrite(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(the model with every dense 2-D convolution as im2col + MatMul, the number rewritten)."""
    g = model.graph
    weights = {t.name: numpy_helper.to_array(t) for t in g.initializer if len(t.dims) == 4}
    if not any(n.op_type == "Conv" and n.input[1] in weights for n in g.node):
        return model, 0
    hw = _static_hw(model)
    new_nodes, new_inits, count = [], [], 0
    for idx, node in enumerate(g.node):
        plan = _plan(node, weights, hw)
        if plan is None:
            new_nodes.append(node)
            continue
        nodes, inits = _nodes(node, plan, weights[node.input[1]], f"conv_gemm{idx}")
        new_nodes += nodes
        new_inits += inits
        count += 1
    if not count:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    out.graph.initializer.extend(new_inits)
    used = {i for n in out.graph.node for i in n.input}
    keep = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out, count
