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


def pack_matmul_weights_pass(rule: Matmul):
    import tvm
    from tvm import relax, tirx
    from tvm.ir.expr import GenericConst

    call_tir = tvm.ir.Op.get("relax.call_tir")

    @tvm.transform.module_pass(opt_level=0, name="shiftc.PackMatmulWeights")
    def _pass(mod, _ctx):
        sites = defaultdict(list)

        def visit(node):
            if isinstance(node, relax.Call) and node.op.same_as(call_tir):
                sites[node.args[0]].append(node)

        for _gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                relax.analysis.post_order_visit(func, visit)

        plans = {}  # GlobalVar -> (param index, NR)
        for gv, calls in sites.items():
            func = mod[gv]
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            info = rule.packable(func)
            if info is None:
                continue
            idx, _nr = info
            if all(
                idx < len(c.args[1].fields) and isinstance(c.args[1].fields[idx], GenericConst) for c in calls
            ):
                plans[gv] = info
        if not plans:
            return mod

        for gv, (_idx, _nr) in plans.items():
            sch = rule._apply(mod[gv], pack=True)
            if sch is None:
                continue
            mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)

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
                if call.op.same_as(call_tir) and call.args[0] in plans:
                    idx, nr = plans[call.args[0]]
                    fields = list(call.args[1].fields)
                    fields[idx] = packed(fields[idx], nr)
                    args = [call.args[0], relax.Tuple(fields), *call.args[2:]]
                    return relax.Call(call.op, args, call.attrs, call.sinfo_args)
                return call

        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gv] = _Rewrite().visit_expr(func)
        return mod

    return _pass
