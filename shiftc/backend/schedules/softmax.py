"""A hand-written row softmax PrimFunc for float32 softmax over the last axis.

The rule-based path (``topi.nn.fast_softmax`` scheduled by :class:`~.reduction.RowReduction`) gets
a symbolic row length (``past + seq``) that no schedule primitive can split into whole vectors and
a tail (``loop_partition`` rejects symbolic extents): the vectorised loops carry a predicate, LLVM
scalarises them, and the polynomial exp runs one lane at a time through full-size intermediate
buffers (max, delta, exp). This PrimFunc is written directly in TIR instead, per row::

    parallel for r:
        max  = hmax(vector max over whole vectors) ; scalar max over the tail
        y    = fast_exp(x - max) per vector, sum accumulated in a vector ; scalar tail
        y   /= sum                                          (whole vectors, scalar tail)

Everything but ``y`` lives in registers / on the stack; the row stays in L1 between the passes.
The exp is the same range-reduced polynomial as ``topi.fast_exp`` (relative error ~1e-7).
:func:`softmax_rows` is called from the Relax-level fast-math pass on a ``[rows, L]`` view of the
input (``reshape`` of a contiguous tensor is free), so any rank and any symbolic extents work.
"""

from __future__ import annotations

_CACHE: dict = {}


def _fast_exp(T, x):
    x = T.max(T.min(x, T.float32(88.376266479492188)), T.float32(-88.376258850097656))
    n = T.floor(x * T.float32(1.4426950216293335) + T.float32(0.5))
    f = x - n * T.float32(0.69314718246459961)
    p = (
        (
            (
                (
                    (T.float32(0.00019875691214110702) * f + T.float32(0.0013981999363750219)) * f
                    + T.float32(0.008333452045917511)
                )
                * f
                + T.float32(0.041665796190500259)
            )
            * f
            + T.float32(0.1666666567325592)
        )
        * f
        + T.float32(0.5)
    ) * f * f + f + T.float32(1.0)
    return T.reinterpret("float32", T.shift_left(T.Cast("int32", n + T.float32(127.0)), 23)) * p


def softmax_rows(lanes: int):
    """PrimFunc ``(X: [rows, L], Y: [rows, L])``: Y = softmax(X, axis=-1), both extents symbolic."""
    if lanes in _CACHE:
        return _CACHE[lanes]
    from tvm.script import tirx as T

    neg = -3.4028234663852886e38

    def fexp(x):
        return _fast_exp(T, x)

    @T.prim_func(private=True)
    def func(var_x: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        L = T.int64()
        X = T.match_buffer(var_x, (rows, L), "float32")
        Y = T.match_buffer(var_y, (rows, L), "float32")
        for r in T.parallel(rows):
            acc = T.decl_buffer((lanes,), "float32")
            red = T.decl_buffer((1,), "float32")
            main = L // lanes * lanes
            # 1. row max
            for v in T.vectorized(lanes):
                acc[v] = T.float32(neg)
            for j in range(L // lanes):
                for v in T.vectorized(lanes):
                    acc[v] = T.max(acc[v], X[r, j * lanes + v])
            red[0] = T.float32(neg)
            for v in range(lanes):
                red[0] = T.max(red[0], acc[v])
            for t in range(L % lanes):
                red[0] = T.max(red[0], X[r, main + t])
            mx: T.float32 = red[0]
            # 2. y = exp(x - max), row sum
            for v in T.vectorized(lanes):
                acc[v] = T.float32(0)
            for j in range(L // lanes):
                for v in T.vectorized(lanes):
                    Y[r, j * lanes + v] = fexp(X[r, j * lanes + v] - mx)
                    acc[v] = acc[v] + Y[r, j * lanes + v]
            red[0] = T.float32(0)
            for v in range(lanes):
                red[0] = red[0] + acc[v]
            for t in range(L % lanes):
                Y[r, main + t] = fexp(X[r, main + t] - mx)
                red[0] = red[0] + Y[r, main + t]
            s: T.float32 = red[0]
            # 3. normalise
            for j in range(L // lanes):
                for v in T.vectorized(lanes):
                    Y[r, j * lanes + v] = Y[r, j * lanes + v] / s
            for t in range(L % lanes):
                Y[r, main + t] = Y[r, main + t] / s

    # Relax passes (FuseOps / FuseTIR) expect a PrimFunc body under a root block.
    from tvm.s_tir.stmt import SBlock, SBlockRealize

    root = SBlock([], [], [], "root", func.body, None, [])
    func = func.with_body(SBlockRealize([], True, root))
    _CACHE[lanes] = func
    return func
