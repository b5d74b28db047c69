"""In-place KV cache: a decoder's attention lowered onto caches that the step writes into.

The ONNX contract of a causal LM (shiftc/frontend/decoder_onnx.py) is functional: each layer takes
``past_key_values.{i}.key|value [B, KVH, P, D]`` and returns ``present.{i}.key|value`` =
``Concat(past, new, axis=2)``. Run as written, every decode step copies the whole cache of every
layer (O(context) per token) and runs attention as five separate ops. For CPU targets the backend
rewrites the graph before import (:func:`rewrite`):

    Concat(past_k, k) -> Transpose -> Unsqueeze ─┐
    q ─────────────────────────────────────────── MatMul -> Mul(scale) -> Add(mask) -> Softmax ─┐
    Concat(past_v, v) -> Unsqueeze ────────────────────────────────────────────────────────── MatMul -> attn
  becomes
    attn = ai.shiftc::CachedAttention(q, k, v, mask, cache.{i}.key, cache.{i}.value, scale)

and the graph's cache inputs become ``cache.{i}.key|value [B, KVH, max_len, D]`` (no present
outputs), float16 by default (``kv_dtype``: half the bytes a long-context step streams; the
kernel widens rows to float32 as it loads them) or float32. The converter below lowers
CachedAttention to two in-place writes (``call_tir_inplace``:
the S new rows go to rows [T − S, T) of the caller's cache tensors, T = the mask's length) and one
call of the attention kernel (csrc/kernels/attention.cc: per query head, scores over the T cached
keys, softmax, weighted sum of values). The library's ``main`` then takes the caches and returns
the logits; the runtimes keep one cache per session (``LMSession``) and grow it by doubling.
``CachedAttention`` lives only inside the backend: it is never written to a file.

The rewrite is all-or-nothing: if any layer does not match the pattern exactly, the graph is left
as it is (functional KV cache) and the reason is returned.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UnsupportedError
from .importer import SHIFTC_DOMAIN, register_converter

OP = "CachedAttention"
PAST = "past_key_values.{i}.{kv}"
CACHE = "cache.{i}.{kv}"
MAX_LEN = "max_len"  # symbolic cache length in the library's signature
TOTAL = "total"  # tokens in the cache after the step (the attention mask's length)


class _Graph:
    def __init__(self, graph: onnx.GraphProto):
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto:
        users = self.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op_type:
            raise _NoMatch(f"'{name}' should feed exactly one {op_type}, feeds {[u.op_type for u in users]}")
        return users[0]

    def const(self, name: str) -> np.ndarray:
        if name not in self.inits:
            raise _NoMatch(f"'{name}' is not an initializer")
        return numpy_helper.to_array(self.inits[name])


class _NoMatch(Exception):
    pass


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _match_layer(gr: _Graph, i: int):
    """(nodes to remove, new node) for layer ``i``, or raise _NoMatch with the reason."""
    concat = {}
    for kv in ("key", "value"):
        past = PAST.format(i=i, kv=kv)
        c = gr.only_consumer(past, "Concat")
        if list(c.input) != [past, c.input[1]] or _attr(c, "axis") not in (2, -2):
            raise _NoMatch(f"'{c.name}' is not Concat([{past}, new], axis=2)")
        if c.output[0] not in gr.outputs:
            raise _NoMatch(f"'{c.name}''s output is not a graph output")
        concat[kv] = c
    kt = gr.only_consumer(concat["key"].output[0], "Transpose")
    if list(_attr(kt, "perm", [])) != [0, 1, 3, 2]:
        raise _NoMatch(f"'{kt.name}' does not swap the last two axes")
    k5 = gr.only_consumer(kt.output[0], "Unsqueeze")
    v5 = gr.only_consumer(concat["value"].output[0], "Unsqueeze")
    for u in (k5, v5):
        if len(u.input) < 2 or gr.const(u.input[1]).tolist() != [2]:
            raise _NoMatch(f"'{u.name}' does not insert axis 2")
    scores = gr.only_consumer(k5.output[0], "MatMul")
    if scores.input[1] != k5.output[0]:
        raise _NoMatch(f"'{scores.name}' does not multiply q by the keys")
    scaled = gr.only_consumer(scores.output[0], "Mul")
    other = [x for x in scaled.input if x != scores.output[0]]
    scale = gr.const(other[0]) if len(other) == 1 else None
    if scale is None or scale.size != 1:
        raise _NoMatch(f"'{scaled.name}' does not multiply by a scalar constant")
    masked = gr.only_consumer(scaled.output[0], "Add")
    mask = [x for x in masked.input if x != scaled.output[0]]
    probs = gr.only_consumer(masked.output[0], "Softmax")
    if _attr(probs, "axis", -1) not in (-1, 4):
        raise _NoMatch(f"'{probs.name}' is not a softmax over the keys")
    attn = gr.only_consumer(probs.output[0], "MatMul")
    if list(attn.input) != [probs.output[0], v5.output[0]]:
        raise _NoMatch(f"'{attn.name}' does not multiply the probabilities by the values")
    if len(mask) != 1:
        raise _NoMatch(f"'{masked.name}' does not add one mask")
    new = helper.make_node(
        OP, [scores.input[0], concat["key"].input[1], concat["value"].input[1], mask[0],
             CACHE.format(i=i, kv="key"), CACHE.format(i=i, kv="value")],
        [attn.output[0]], name=f"l{i}_cached_attention", domain=SHIFTC_DOMAIN, scale=float(scale.reshape(-1)[0]))
    return [concat["key"], concat["value"], kt, k5, v5, scores, scaled, masked, probs, attn], new


KV_DTYPES = {"float16": onnx.TensorProto.FLOAT16, "float32": onnx.TensorProto.FLOAT}


def rewrite(model: onnx.ModelProto, num_layers: int, kv_dtype: str = "float16") -> tuple[onnx.ModelProto | None, str]:
    """(the model with every layer's attention on an in-place cache of ``kv_dtype`` elements, "")
    or (None, the reason); ``kv_dtype`` is a key of KV_DTYPES (compile_model checks it)."""
    gr = _Graph(model.graph)
    removed, added = set(), {}
    try:
        for i in range(num_layers):
            nodes, new = _match_layer(gr, i)
            removed.update(id(n) for n in nodes)
            added[id(nodes[-1])] = new
    except _NoMatch as exc:
        return None, f"layer {i}: {exc}"
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = []
    for n in model.graph.node:
        if id(n) in added:
            nodes.append(added[id(n)])
        elif id(n) not in removed:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    inputs = []
    for vi in model.graph.input:
        vi2 = onnx.ValueInfoProto()
        vi2.CopyFrom(vi)
        if vi.name.startswith("past_key_values."):
            _, i, kv = vi.name.split(".")
            vi2.name = CACHE.format(i=i, kv=kv)
            vi2.type.tensor_type.shape.dim[2].ClearField("dim_value")
            vi2.type.tensor_type.shape.dim[2].dim_param = MAX_LEN
            vi2.type.tensor_type.elem_type = KV_DTYPES[kv_dtype]
        elif vi.name == "attention_mask":
            vi2.type.tensor_type.shape.dim[1].dim_param = TOTAL
        inputs.append(vi2)
    del g.input[:]
    g.input.extend(inputs)
    outputs = [o for o in model.graph.output if not o.name.startswith("present.")]
    del g.output[:]
    g.output.extend(outputs)
    return out, ""


# -- lowering -------------------------------------------------------------------------------------


def _write_primfunc(d: int, dtype: str):
    """cache [B, H, M, D] <- new [B, H, S, D] at rows [T − S, T); T from mask [B, 1, 1, S, T].
    A float16 cache is written by the kernel (shiftc_kv_write_f16: rounding to nearest even on
    every target, with no dependence on the code generator's half-precision support)."""
    from tvm.script import tirx as T

    from .shiftc_ops import EXTERN_ATTR

    f16 = dtype == "float16"

    @T.prim_func(private=True)
    def kv_write(c_h: T.handle, n_h: T.handle, m_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, h, m, s, t = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(c_h, (b, h, m, d), dtype)
        new = T.match_buffer(n_h, (b, h, s, d), "float32")
        T.match_buffer(m_h, (b, 1, 1, s, t), "float32")
        if f16:  # a Python constant: the parser keeps one branch
            T.evaluate(T.call_extern("int32", "shiftc_kv_write_f16", cache.data, new.data, b * h, s, t, m, T.int64(d)))
        else:
            for bh in T.serial(b * h):
                for r in T.serial(s):
                    for j in T.vectorized(T.int64(d)):
                        cache[bh // h, bh % h, t - s + r, j] = new[bh // h, bh % h, r, j]

    func = kv_write.with_attr(EXTERN_ATTR, True) if f16 else kv_write
    return func.with_attr("op_pattern", 8)  # opaque: fusion must not merge producers into an in-place write


def _attention_primfunc(kvh: int, g: int, d: int, scale: float, dtype: str):
    from tvm.script import tirx as T

    from .shiftc_ops import EXTERN_ATTR

    kernel = "shiftc_attention_f16" if dtype == "float16" else "shiftc_attention"

    @T.prim_func(private=True)
    def cached_attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, m, s, t = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, kvh, g, s, d), "float32")
        kc = T.match_buffer(k_h, (b, kvh, m, d), dtype)
        vc = T.match_buffer(v_h, (b, kvh, m, d), dtype)
        mask = T.match_buffer(m_h, (b, 1, 1, s, t), "float32")
        out = T.match_buffer(o_h, (b, kvh, g, s, d), "float32")
        for task in T.parallel(b * T.int64(kvh * g)):
            T.evaluate(T.call_extern(
                "int32", kernel, q.data, kc.data, vc.data, mask.data, b, T.int64(kvh), T.int64(g), s, t,
                m, T.int64(d), T.float32(scale), out.data, task))

    return cached_attention.with_attr(EXTERN_ATTR, True).with_attr("op_pattern", 8)


@register_converter(SHIFTC_DOMAIN, OP)
def _cached_attention(bb, inputs, attrs, node):
    from tvm import relax

    q, k, v, mask, kc, vc = (bb.normalize(x) for x in inputs)
    qs, ks, cs = list(q.ty.shape), list(k.ty.shape), list(kc.ty.shape)
    if len(qs) != 5 or len(ks) != 4 or len(cs) != 4:
        raise UnsupportedError(f"node '{node.name}' ({OP}): q {qs}, k {ks}, cache {cs}: expected ranks 5, 4, 4")
    kvh, g, d = int(qs[1]), int(qs[2]), int(qs[4])
    dtype = str(kc.ty.dtype)
    if dtype not in KV_DTYPES or str(vc.ty.dtype) != dtype:
        raise UnsupportedError(f"node '{node.name}' ({OP}): caches of {kc.ty.dtype}/{vc.ty.dtype}, expected float16 or float32")
    ms = list(mask.ty.shape)
    mask = bb.emit(relax.op.broadcast_to(mask, [qs[0], 1, 1, qs[3], ms[-1]]))
    write = bb.add_func(_write_primfunc(d, dtype), f"shiftc_kv_write_{dtype}_d{d}")
    kc2 = bb.emit(relax.call_tir_inplace(write, [kc, k, mask], [0], kc.ty))
    vc2 = bb.emit(relax.call_tir_inplace(write, [vc, v, mask], [0], vc.ty))
    attn = bb.add_func(_attention_primfunc(kvh, g, d, float(attrs["scale"]), dtype),
                       f"shiftc_cached_attention_{dtype}_{kvh}x{g}x{d}")
    return relax.call_tir(attn, [q, kc2, vc2, mask], relax.TensorType(qs, "float32"))
