"""Channel rules: one handler per op type, mapping a channel dimension on one port to the others.

A *dimension* is ``(tensor, axis, idx, unit)``: the element indices ``idx`` along ``axis`` of
``tensor`` that belong to the group, and for each the group *unit* (channel, head, KV group) it
belongs to. A handler receives the node, the port where the dimension was found (``("in", i)``
or ``("out", i)``) and the dimension, and calls ``ctx.link`` for every coupled dimension on the
other ports, ``ctx.edit`` for attributes or shape constants that must follow a removal, or raises
:class:`Refuse` (the group cannot be pruned, with the reason) or :class:`Coarsen` (the units
must be merged k at a time: a Reshape splits the axis into heads coarser than the unit).

The two dependency rules (as in DepGraph) are encoded here:
    * between layers: an output channel of a producer and the matching input channel of every
      consumer are removed together (elementwise ops, residual Adds, norms pass the dimension on);
    * within a layer: an input channel of a weight follows the output channel that produces it
      (MatMul K, Conv input channels); for depthwise / grouped Conv the output channels of a group
      follow its input channels (and the ``group`` attribute shrinks).
"""

from __future__ import annotations

import numpy as np
from onnx import helper


class Refuse(Exception):
    """The group touching this node cannot be pruned safely (the message says why)."""


class Coarsen(Exception):
    """Units must be merged ``factor`` at a time (consecutive units) for the mapping to exist."""

    def __init__(self, factor: int, why: str):
        super().__init__(why)
        self.factor = factor


RULES: dict = {}


def rule(*op_types):
    def deco(fn):
        for t in op_types:
            RULES[t] = fn
        return fn
    return deco


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# -- elementwise -------------------------------------------------------------------------------

UNARY = ("Relu", "Sigmoid", "Tanh", "Clip", "Cast", "Identity", "Neg", "Sqrt", "Exp", "Erf", "Abs",
         "HardSigmoid", "HardSwish", "LeakyRelu", "Softplus", "Gelu", "Elu", "Selu", "Mish", "Dropout",
         "Reciprocal", "Log", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "PRelu")


@rule(*UNARY)
def _unary(ctx, node, port, d):
    if port == ("in", 0):
        ctx.link(node.output[0], d.axis, d)
    elif port[0] == "out" and port[1] == 0:
        ctx.link(node.input[0], d.axis, d)
    elif node.op_type == "PRelu":
        _broadcast(ctx, node, port, d)
    elif port[0] == "in":  # Clip min/max, scalars
        raise Refuse(f"channel dimension reaches parameter input {port[1]} of {node.op_type} '{node.name}'")


@rule("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Sum", "Equal", "Less", "Greater")
def _broadcast(ctx, node, port, d):
    """Numpy broadcasting: dimensions align from the right; an operand of size 1 there is not coupled."""
    out = node.output[0]
    r_out = ctx.rank(out)
    r_port = ctx.rank(node.input[port[1]] if port[0] == "in" else out)
    a_out = d.axis + (r_out - r_port)
    for i, name in enumerate(node.input):
        if not name or (port == ("in", i) and name == node.input[port[1]]):
            continue
        r = ctx.rank(name)
        a = a_out - (r_out - r)
        if a < 0 or ctx.dim(name, a) == 1:
            continue
        ctx.link(name, a, d)
    if port[0] == "in":
        ctx.link(out, a_out, d)


# -- layout ops --------------------------------------------------------------------------------


@rule("Transpose")
def _transpose(ctx, node, port, d):
    perm = list(_attr(node, "perm") or reversed(range(ctx.rank(node.input[0]))))
    if port[0] == "in":
        ctx.link(node.output[0], perm.index(d.axis), d)
    else:
        ctx.link(node.input[0], perm[d.axis], d)


def _axes(ctx, node, attr_name="axes", input_index=1):
    axes = _attr(node, attr_name)
    if axes is None and len(node.input) > input_index and node.input[input_index]:
        v = ctx.const(node.input[input_index])
        if v is None:
            raise Refuse(f"{node.op_type} '{node.name}' has computed axes")
        axes = v.tolist()
    return axes


@rule("Unsqueeze")
def _unsqueeze(ctx, node, port, d):
    r_out = ctx.rank(node.output[0])
    axes = sorted(_norm_axis(a, r_out) for a in _axes(ctx, node))
    kept = [i for i in range(r_out) if i not in axes]  # output axis of each input axis
    if port[0] == "in" and port[1] == 0:
        ctx.link(node.output[0], kept[d.axis], d)
    elif port[0] == "out":
        ctx.link(node.input[0], kept.index(d.axis), d)


@rule("Squeeze")
def _squeeze(ctx, node, port, d):
    r_in = ctx.rank(node.input[0])
    axes = _axes(ctx, node)
    axes = sorted(_norm_axis(a, r_in) for a in axes) if axes is not None else \
        [i for i in range(r_in) if ctx.dim(node.input[0], i) == 1]
    kept = [i for i in range(r_in) if i not in axes]
    if port[0] == "in" and port[1] == 0:
        ctx.link(node.output[0], kept.index(d.axis), d)
    elif port[0] == "out":
        ctx.link(node.input[0], kept[d.axis], d)


def _blocks(a: list, b: list) -> list[tuple[list[int], list[int]]]:
    """Split two shapes of equal size into aligned runs of axes with equal products."""
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        ia, jb = [i], [j]
        if i >= len(a) or j >= len(b):  # trailing size-1 axes join the last run
            rest_a, rest_b = a[i:], b[j:]
            if not out or any(x != 1 for x in rest_a + rest_b):
                raise Refuse("shapes do not factor")
            out[-1] = (out[-1][0] + list(range(i, len(a))), out[-1][1] + list(range(j, len(b))))
            break
        pa, pb = a[i], b[j]
        if not isinstance(pa, int) or not isinstance(pb, int):
            if pa != pb or pa is None:
                raise Refuse(f"symbolic dims {pa!r} and {pb!r} do not match")
            out.append((ia, jb))
            i, j = i + 1, j + 1
            continue
        while pa != pb:
            if pa < pb:
                i += 1
                if i >= len(a) or not isinstance(a[i], int):
                    raise Refuse("shapes do not factor")
                pa *= a[i]
                ia.append(i)
            else:
                j += 1
                if j >= len(b) or not isinstance(b[j], int):
                    raise Refuse("shapes do not factor")
                pb *= b[j]
                jb.append(j)
        out.append((ia, jb))
        i, j = i + 1, j + 1
    return out


def map_reshape(src_shape, dst_shape, axis, d, what):
    """Map a dimension through a reshape from ``src_shape`` to ``dst_shape``: (dst axis, idx, unit).

    Each unit's elements, seen in the flat space of the aligned run of axes, must be a whole
    slab of one destination axis (all indices of the other axes of the run); otherwise units are
    merged (:class:`Coarsen`) or the group is refused.
    """
    for src_axes, dst_axes in _blocks(list(src_shape), list(dst_shape)):
        if axis in src_axes:
            break
    if len(src_axes) == 1 and len(dst_axes) == 1:
        return dst_axes[0], d.idx, d.unit
    sdims = [src_shape[i] for i in src_axes]
    ddims = [dst_shape[i] for i in dst_axes]
    size = int(np.prod(sdims))
    units = np.unique(d.unit)
    # mask[u, flat] = element of unit u, over the flat space of the run of axes
    pos = src_axes.index(axis)
    lab = np.full(sdims[pos], -1, np.int64)
    lab[d.idx] = np.searchsorted(units, d.unit)
    shape = [1] * len(sdims)
    shape[pos] = sdims[pos]
    lab = np.broadcast_to(lab.reshape(shape), sdims).reshape(-1)
    mask = lab[None, :] == np.arange(len(units))[:, None]
    m = mask.reshape([len(units)] + ddims)
    for b in range(len(ddims)):
        other = tuple(i + 1 for i in range(len(ddims)) if i != b)
        sel = m.any(axis=other) if other else m
        full = m.all(axis=other) if other else m
        if np.array_equal(sel, full) and sel.sum(axis=1).min() > 0:
            rows, cols = np.nonzero(sel)
            return dst_axes[b], cols.astype(np.int64), units[rows]
    # no axis works: merging consecutive units may help (e.g. channels -> heads)
    n = len(units)
    for k in range(2, n + 1):
        if n % k:
            continue
        mk = mask.reshape(n // k, k, size).any(axis=1).reshape([n // k] + ddims)
        for b in range(len(ddims)):
            other = tuple(i + 1 for i in range(len(ddims)) if i != b)
            if other and np.array_equal(mk.any(axis=other), mk.all(axis=other)):
                raise Coarsen(k, f"{what}: units merged {k} at a time")
    raise Refuse(f"{what} splits the channel axis across axes {ddims} in a way no unit can follow")


@rule("Reshape", "Flatten")
def _reshape(ctx, node, port, d):
    src, dst = node.input[0], node.output[0]
    s_in, s_out = ctx.shape(src), ctx.shape(dst)
    if s_in is None or s_out is None:
        raise Refuse(f"{node.op_type} '{node.name}': shapes unknown")
    what = f"{node.op_type} '{node.name}'"
    if port == ("in", 0):
        axis, idx, unit = map_reshape(s_in, s_out, d.axis, d, what)
        if node.op_type == "Reshape":
            ctx.edit("reshape", node.name, axis)
        ctx.link(dst, axis, d.replace(idx=idx, unit=unit))
    elif port[0] == "out":
        axis, idx, unit = map_reshape(s_out, s_in, d.axis, d, what)
        if node.op_type == "Reshape":
            ctx.edit("reshape", node.name, d.axis)
        ctx.link(src, axis, d.replace(idx=idx, unit=unit))
    else:
        raise Refuse(f"channel dimension reaches the shape input of {what}")


def _offsets(ctx, parts, axis: int, refusal: str) -> np.ndarray:
    """Where each of ``parts`` starts along ``axis`` of the joined tensor (Concat's output, Split's input)."""
    sizes = [ctx.dim(n, axis) for n in parts]
    if any(not isinstance(s, int) for s in sizes):
        raise Refuse(refusal)
    return np.cumsum([0] + sizes)


def _to_parts(ctx, parts, axis: int, offs: np.ndarray, d) -> None:
    """Channels ``d`` of the joined tensor, handed to the parts that hold them."""
    for i, name in enumerate(parts):
        sel = (d.idx >= offs[i]) & (d.idx < offs[i + 1])
        if sel.any():
            ctx.link(name, axis, d.replace(idx=d.idx[sel] - offs[i], unit=d.unit[sel]))


@rule("Concat")
def _concat(ctx, node, port, d):
    r = ctx.rank(node.output[0])
    axis = _norm_axis(_attr(node, "axis"), r)
    if d.axis != axis:
        for name in list(node.input) + [node.output[0]]:
            if ctx.dim(name, d.axis) != 1 or name == node.output[0]:
                ctx.link(name, d.axis, d)
        return
    offs = _offsets(ctx, node.input, axis, f"Concat '{node.name}' joins inputs of unknown width on the channel axis")
    if port[0] == "in":
        ctx.link(node.output[0], axis, d.replace(idx=d.idx + offs[port[1]]))
    else:
        _to_parts(ctx, node.input, axis, offs, d)


@rule("Split")
def _split(ctx, node, port, d):
    r = ctx.rank(node.input[0])
    axis = _norm_axis(_attr(node, "axis", 0), r)
    if d.axis != axis:
        for name in [node.input[0]] + list(node.output):
            ctx.link(name, d.axis, d)
        return
    offs = _offsets(ctx, node.output, axis, f"Split '{node.name}': output widths unknown")
    ctx.edit("split", node.name, axis)
    if port[0] == "out":
        ctx.link(node.input[0], axis, d.replace(idx=d.idx + offs[port[1]]))
    elif port == ("in", 0):
        _to_parts(ctx, node.output, axis, offs, d)
    else:
        raise Refuse(f"channel dimension reaches the split sizes of Split '{node.name}'")


@rule("Gather")
def _gather(ctx, node, port, d):
    r_data = ctx.rank(node.input[0])
    r_idx = ctx.rank(node.input[1])
    axis = _norm_axis(_attr(node, "axis", 0), r_data)
    if port == ("in", 0):
        if d.axis == axis:
            raise Refuse(f"Gather '{node.name}' indexes the channel axis")
        ctx.link(node.output[0], d.axis if d.axis < axis else d.axis - 1 + r_idx, d)
    elif port[0] == "out":
        if d.axis < axis:
            ctx.link(node.input[0], d.axis, d)
        elif d.axis >= axis + r_idx:
            ctx.link(node.input[0], d.axis - r_idx + 1, d)
        else:
            raise Refuse(f"Gather '{node.name}': channel axis comes from the indices")
    else:
        raise Refuse(f"channel dimension reaches the indices of Gather '{node.name}'")


# -- reductions and normalisations -------------------------------------------------------------


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare", "ReduceProd")
def _reduce(ctx, node, port, d):
    r_in = ctx.rank(node.input[0])
    axes = _axes(ctx, node)
    axes = list(range(r_in)) if not axes else sorted(_norm_axis(a, r_in) for a in axes)
    keep = _attr(node, "keepdims", 1)
    if port[0] == "in":
        if d.axis in axes:
            raise Refuse(f"{node.op_type} '{node.name}' reduces over the channel axis "
                         f"(removing channels would change its result)")
        ctx.link(node.output[0], d.axis if keep else d.axis - sum(a < d.axis for a in axes), d)
    else:
        kept = list(range(r_in)) if keep else [i for i in range(r_in) if i not in axes]
        ctx.link(node.input[0], kept[d.axis], d)


@rule("Softmax", "LogSoftmax")
def _softmax(ctx, node, port, d):
    r = ctx.rank(node.input[0])
    if d.axis == _norm_axis(_attr(node, "axis", -1), r):
        raise Refuse(f"{node.op_type} '{node.name}' normalizes over the channel axis")
    ctx.link(node.output[0] if port[0] == "in" else node.input[0], d.axis, d)


@rule("LayerNormalization")
def _layernorm(ctx, node, port, d):
    r = ctx.rank(node.input[0])
    first = _norm_axis(_attr(node, "axis", -1), r)
    if port[0] == "in" and port[1] > 0 or port[0] == "out" and port[1] > 0:
        raise Refuse(f"LayerNormalization '{node.name}' normalizes over the channel axis")
    if d.axis >= first:
        raise Refuse(f"LayerNormalization '{node.name}' normalizes over the channel axis")
    ctx.link(node.output[0] if port[0] == "in" else node.input[0], d.axis, d)


@rule("BatchNormalization", "InstanceNormalization")
def _batchnorm(ctx, node, port, d):
    x, y = node.input[0], node.output[0]
    axis = d.axis if port[0] == "out" or port[1] == 0 else 1
    if port[0] == "out" and port[1] > 0:
        raise Refuse(f"{node.op_type} '{node.name}' training outputs are not supported")
    for name in [x, y]:
        if not (port[0] == "in" and port[1] == 0 and name == x) and not (port == ("out", 0) and name == y):
            ctx.link(name, axis, d)
    if axis == 1:
        for name in node.input[1:]:
            if name:
                ctx.link(name, 0, d)


@rule("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize", "Upsample",
      "DepthToSpace", "SpaceToDepth")
def _pool(ctx, node, port, d):
    if port[1] != 0:
        raise Refuse(f"channel dimension reaches input {port[1]} of {node.op_type} '{node.name}'")
    if d.axis > 1 or node.op_type in ("DepthToSpace", "SpaceToDepth") and d.axis == 1:
        raise Refuse(f"{node.op_type} '{node.name}' mixes the channel axis with spatial axes")
    ctx.link(node.output[0] if port[0] == "in" else node.input[0], d.axis, d)


@rule("Pad")
def _pad(ctx, node, port, d):
    if port[1] != 0:
        raise Refuse(f"channel dimension reaches input {port[1]} of Pad '{node.name}'")
    pads = ctx.const(node.input[1]) if len(node.input) > 1 else np.asarray(_attr(node, "pads"))
    r = ctx.rank(node.input[0])
    if pads is None or pads[d.axis] or pads[d.axis + r]:
        raise Refuse(f"Pad '{node.name}' pads the channel axis")
    ctx.link(node.output[0] if port[0] == "in" else node.input[0], d.axis, d)


# -- layers with weights -----------------------------------------------------------------------


@rule("MatMul")
def _matmul(ctx, node, port, d):
    a, b, y = node.input[0], node.input[1], node.output[0]
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    if ra < 2 or rb < 2:
        raise Refuse(f"MatMul '{node.name}' with a vector operand")
    if port == ("in", 0):
        kind, batch = ("k", None) if d.axis == ra - 1 else ("m", None) if d.axis == ra - 2 else ("batch", d.axis + ry - ra)
    elif port == ("in", 1):
        kind, batch = ("k", None) if d.axis == rb - 2 else ("n", None) if d.axis == rb - 1 else ("batch", d.axis + ry - rb)
    else:
        kind, batch = ("n", None) if d.axis == ry - 1 else ("m", None) if d.axis == ry - 2 else ("batch", d.axis)
    if kind == "k":
        ctx.link(a, ra - 1, d)
        ctx.link(b, rb - 2, d)
    elif kind == "m":
        ctx.link(a, ra - 2, d)
        ctx.link(y, ry - 2, d)
    elif kind == "n":
        ctx.link(b, rb - 1, d)
        ctx.link(y, ry - 1, d)
    else:
        ctx.link(y, batch, d)
        for name, r in ((a, ra), (b, rb)):
            ax = batch - (ry - r)
            if ax >= 0 and ctx.dim(name, ax) != 1:
                ctx.link(name, ax, d)


@rule("Gemm")
def _gemm(ctx, node, port, d):
    ta, tb = _attr(node, "transA", 0), _attr(node, "transB", 0)
    a, b, y = node.input[0], node.input[1], node.output[0]
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    k_a, m_a = (0, 1) if ta else (1, 0)
    k_b, n_b = (1, 0) if tb else (0, 1)
    if port == ("in", 0):
        kind = "k" if d.axis == k_a else "m"
    elif port == ("in", 1):
        kind = "k" if d.axis == k_b else "n"
    elif port == ("in", 2):
        rc = ctx.rank(c)
        kind = "n" if d.axis == rc - 1 else "m"
    else:
        kind = "n" if d.axis == 1 else "m"
    if kind == "k":
        ctx.link(a, k_a, d)
        ctx.link(b, k_b, d)
        return
    ctx.link(y, 1 if kind == "n" else 0, d)
    if kind == "n":
        ctx.link(b, n_b, d)
    else:
        ctx.link(a, m_a, d)
    if c is not None:
        rc = ctx.rank(c)
        ax = (rc - 1) if kind == "n" else (rc - 2)
        if ax >= 0 and ctx.dim(c, ax) != 1:
            ctx.link(c, ax, d)


@rule("Conv")
def _conv(ctx, node, port, d):
    x, w, y = node.input[0], node.input[1], node.output[0]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    groups = _attr(node, "group", 1)
    m, cg = ctx.dim(w, 0), ctx.dim(w, 1)
    # which side: "in" (input channels), "out" (output channels) or "batch"
    if port == ("in", 0):
        side = "in" if d.axis == 1 else "batch" if d.axis == 0 else None
    elif port == ("in", 1):
        side = "out" if d.axis == 0 else "in" if d.axis == 1 else None
    elif port == ("in", 2):
        side = "out"
    else:
        side = "out" if d.axis == 1 else "batch" if d.axis == 0 else None
    if side is None:
        raise Refuse(f"Conv '{node.name}': channel dimension on a spatial axis")
    if side == "batch":
        ctx.link(y if port[0] == "in" else x, 0, d)
        return
    if groups == 1:
        if side == "in":
            ctx.link(x, 1, d)
            ctx.link(w, 1, d)
        else:
            ctx.link(y, 1, d)
            ctx.link(w, 0, d)
            if bias:
                ctx.link(bias, 0, d)
        return
    # grouped / depthwise: a unit must hold whole groups; the group's in and out channels go together
    if side == "in" and port == ("in", 1):
        raise Refuse(f"Conv '{node.name}' (group={groups}): per-group input channels cannot be removed")
    per = cg if side == "in" else m // groups
    g_of = d.idx // per
    units_per_group = set()
    for gi in np.unique(g_of):
        us = np.unique(d.unit[g_of == gi])
        if (g_of == gi).sum() != per:
            raise Refuse(f"Conv '{node.name}' (group={groups}) can only lose whole groups")
        units_per_group.add(len(us))
    if units_per_group != {1}:
        k = units_per_group.pop() if len(units_per_group) == 1 else 0
        if k and all(len(np.unique(g_of[d.unit == u])) == 1 for u in np.unique(d.unit)):
            raise Coarsen(k, f"Conv '{node.name}' (group={groups}): {k} channels per group")
        raise Refuse(f"Conv '{node.name}' (group={groups}) can only lose whole groups")
    gs = np.unique(g_of)
    gunit = np.array([d.unit[g_of == gi][0] for gi in gs])
    mo = m // groups
    out_idx = (gs[:, None] * mo + np.arange(mo)).reshape(-1)
    out_unit = np.repeat(gunit, mo)
    in_idx = (gs[:, None] * cg + np.arange(cg)).reshape(-1)
    in_unit = np.repeat(gunit, cg)
    ctx.edit("conv_group", node.name, per_group_out=mo)
    ctx.link(x, 1, d.replace(idx=in_idx, unit=in_unit))
    ctx.link(y, 1, d.replace(idx=out_idx, unit=out_unit))
    ctx.link(w, 0, d.replace(idx=out_idx, unit=out_unit))
    if bias:
        ctx.link(bias, 0, d.replace(idx=out_idx, unit=out_unit))
