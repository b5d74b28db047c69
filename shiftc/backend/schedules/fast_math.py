"""Vectorisable exp for softmax and sigmoid (Relax level, before legalisation).

LLVM has no vector ``exp`` without a vector math library, so ``T.exp`` inside a vectorised loop is
split into one libm call per lane: softmax and the SiLU of every MLP were the largest non-matmul
costs of a prefill. ``topi.fast_exp`` is a range-reduced polynomial written in plain arithmetic
(relative error ~1e-7 for float32), which vectorises; softmax becomes ``topi.nn.fast_softmax`` and
``sigmoid(x)`` becomes ``1 / (1 + fast_exp(-x))``. Other dtypes are left alone.
"""

from __future__ import annotations


def fast_math_pass():
    import tvm
    from tvm import relax, te, topi

    def _fast_sigmoid(x):
        e = topi.fast_exp(topi.negative(x))
        return topi.divide(tvm.tirx.const(1.0, x.dtype), topi.add(tvm.tirx.const(1.0, x.dtype), e))

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = getattr(call.op, "name", "")
            if name in ("relax.nn.softmax", "relax.sigmoid", "relax.exp"):
                x = call.args[0]
                dtype = getattr(getattr(x, "ty", None), "dtype", None)
                if dtype != "float32":
                    return call
                if name == "relax.nn.softmax":
                    return self.builder_.call_te(topi.nn.fast_softmax, x, call.attrs.axis)
                if name == "relax.sigmoid":
                    return self.builder_.call_te(_fast_sigmoid, x)
                return self.builder_.call_te(topi.fast_exp, x)
            return call

    @tvm.transform.module_pass(opt_level=0, name="shiftc.FastMath")
    def _pass(mod, _ctx):
        rw = _Rewrite(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        return rw.builder_.get()

    return _pass
