"""Compile-time packing of constant matmul weights into panel-major layout.

For every matmul-like PrimFunc the :class:`~.matmul.Matmul` rule can schedule whose B operand is a
static ``[K, N]`` parameter bound to a constant at *every* call site, the weight is repacked with
numpy to ``[N / NR, K, NR]`` (NR = the register tile width) and the PrimFunc is scheduled reading
the packed layout. Each K x NR panel is then one contiguous stream: no cache-set conflicts or TLB
misses from the ``N * 4``-byte row stride (49152 columns for an LM head), and the hardware
prefetcher sees a sequential read, which is what decode (memory-bound GEMV) needs.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .matmul import Matmul


def _packing_plans(mod, rule: Matmul, call_tir) -> dict:
    """{PrimFunc name: (parameter index, NR)} of the matmuls whose weight is a constant at every
    call site and that the rule can schedule on a packed weight."""
    from tvm import relax, tirx
    from tvm.ir.expr import GenericConst

    sites = defaultdict(list)

    def visit(node):
        if isinstance(node, relax.Call) and node.op.same_as(call_tir):
            sites[node.args[0].name_hint].append(node)

    for _gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    plans = {}
    for name, calls in sites.items():
        func = mod[name]
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        info = rule.packable(func)
        if info is None:
            continue
        idx, _nr = info
        if all(idx < len(c.args[1].fields) and isinstance(c.args[1].fields[idx], GenericConst) for c in calls):
            plans[name] = info
    return plans


def pack_matmul_weights_pass(rule: Matmul):
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")

    @tvm.transform.module_pass(opt_level=0, name="shiftc.PackMatmulWeights")
    def _pass(mod, _ctx):
        plans = _packing_plans(mod, rule, call_tir)  # PrimFunc name -> (param index, NR)
        if not plans:
            return mod

        new_gvs, scheduled = {}, {}
        for name in list(plans):
            sch = rule.schedule(mod[name], pack=True)
            if sch is None:
                del plans[name]
                continue
            # a fresh GlobalVar: the old one carries the old (unpacked) signature
            scheduled[name] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        if not scheduled:
            return mod
        for name in scheduled:
            del mod[mod.get_global_var(name)]
        bb = relax.BlockBuilder(mod)
        for name, func in scheduled.items():
            new_gvs[name] = bb.add_func(func, name)
        mod = bb.get()

        packed_cache = {}

        def packed(const, nr):
            key = (const, nr)
            if key not in packed_cache:
                w = const.value.numpy()
                k, n = w.shape
                p = np.ascontiguousarray(w.reshape(k, n // nr, nr).transpose(1, 0, 2))
                packed_cache[key] = relax.const(p, str(w.dtype))
            return packed_cache[key]

        @relax.expr_functor.mutator
        class _Rewrite(relax.PyExprMutator):
            def visit_call_(self, call):
                call = super().visit_call_(call)
                if call.op.same_as(call_tir) and call.args[0].name_hint in plans:
                    idx, nr = plans[call.args[0].name_hint]
                    fields = list(call.args[1].fields)
                    fields[idx] = packed(fields[idx], nr)
                    args = [new_gvs[call.args[0].name_hint], relax.Tuple(fields), *call.args[2:]]
                    return relax.Call(call.op, args, call.attrs, call.ty_args)
                return call

        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gv] = _Rewrite().visit_expr(func)
        return mod

    return _pass
