"""Vectorisable exp for softmax and sigmoid (Relax level, before legalisation).

LLVM has no vector ``exp`` without a vector math library, so ``T.exp`` inside a vectorised loop is
split into one libm call per lane: softmax and the SiLU of every MLP were the largest non-matmul
costs of a prefill. ``topi.fast_exp`` is a range-reduced polynomial written in plain arithmetic
(relative error ~1e-7 for float32), which vectorises; softmax becomes ``topi.nn.fast_softmax`` and
``sigmoid(x)`` becomes ``1 / (1 + fast_exp(-x))``. Other dtypes are left alone.

A float32 softmax over the last axis goes further: it becomes a call to the hand-written row
softmax of :mod:`.softmax` (whole vectors + a scalar tail for a symbolic row length, per-row
max / sum in registers) on a ``[rows, L]`` view of its input, when ``lanes`` is given.
"""

from __future__ import annotations


def fast_math_pass(lanes: int | None = None):
    import tvm
    from tvm import relax, te, topi

    from tvm.sym.analyzer import Analyzer

    from .softmax import softmax_rows

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
                    rows = self._row_softmax(x, call.attrs.axis)
                    if rows is not None:
                        return rows
                    return self.builder_.call_te(topi.nn.fast_softmax, x, call.attrs.axis)
                if name == "relax.sigmoid":
                    return self.builder_.call_te(_fast_sigmoid, x)
                return self.builder_.call_te(topi.fast_exp, x)
            return call

        def _row_softmax(self, x, axis):
            """reshape -> [rows, L] -> hand-written row softmax -> reshape back (last axis only)."""
            if lanes is None:
                return None
            shape = getattr(x.ty, "shape", None)
            ndim = getattr(x.ty, "ndim", -1)
            if shape is None or ndim < 1 or axis not in (-1, ndim - 1):
                return None
            dims = [d for d in shape.values]
            rows = tvm.tirx.const(1, "int64")
            for d in dims[:-1]:
                rows = rows * d
            rows = Analyzer().simplify(rows)
            if self._gv is None:
                self._gv = self.builder_.add_func(softmax_rows(lanes), "shiftc_softmax_rows")
            x2 = self.builder_.emit(relax.op.reshape(x, [rows, dims[-1]]))
            y2 = self.builder_.emit(
                relax.call_tir(self._gv, [x2], relax.TensorType([rows, dims[-1]], "float32"))
            )
            return relax.op.reshape(y2, dims)

    @tvm.transform.module_pass(opt_level=0, name="shiftc.FastMath")
    def _pass(mod, _ctx):
        rw = _Rewrite(mod)
        rw._gv = None
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        return rw.builder_.get()

    return _pass
