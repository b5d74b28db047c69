"""Helpers shared by shiftc's CPU schedule rules."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target


def is_llvm(target: Target) -> bool:
    return target is not None and target.kind.name == "llvm"


#: An element-wise or spatial-reduction function whose buffers hold at most this many elements per
#: index of their symbolic dimensions (the tokens of a step: a decode step has one) runs serially:
#: the norms, residual adds, rope and activations of a decode step are a few microseconds of work
#: each, less than opening a parallel region on the thread pool. SmolLM2 3-bit decode: 8% faster at
#: 2 threads, 3% at 1; a 512-token prefill pays these functions' serial time instead (about 1%).
SERIAL_ELEMENTS = 16384


def elements_per_step(func: tirx.PrimFunc) -> int:
    """The largest product of a buffer's static dimensions in ``func`` (symbolic ones count 1)."""
    most = 1
    for buf in func.params:  # TVM 0.27: the parameters are the buffers
        n = 1
        for d in getattr(buf, "shape", ()):
            if isinstance(d, tirx.IntImm):
                n *= int(d.value)
        most = max(most, n)
    return most


def worth_parallel(func: tirx.PrimFunc) -> bool:
    return elements_per_step(func) > SERIAL_ELEMENTS


def extent_of(sch: s_tir.Schedule, loop) -> int | tirx.PrimExpr:
    ext = sch.get(loop).extent
    return ext.value if isinstance(ext, tirx.IntImm) else ext


def vars_in(exprs) -> set:
    from tvm.tirx.analysis import undefined_vars

    found = set()
    for e in exprs:
        found.update(undefined_vars(e, []))
    return found


def vectorize_innermost(sch: s_tir.Schedule, block, lanes: int) -> bool:
    """Vectorise the innermost loop of ``block`` when its extent is static.

    Extents that are a multiple of ``lanes`` are split into native-width vectors (the outer part
    unrolled when short); small static extents are vectorised whole; symbolic extents are left
    scalar (a predicated vector loop would be scalarised anyway).
    """
    loops = sch.get_loops(block)
    if not loops:
        return False
    inner = loops[-1]
    ext = extent_of(sch, inner)
    if not isinstance(ext, int) or ext < 2:
        return False
    if ext % lanes == 0 and ext > lanes:
        outer, vec = sch.split(inner, [None, lanes])
        if ext // lanes <= 8:
            sch.unroll(outer)
        sch.vectorize(vec)
    elif ext <= lanes:
        sch.vectorize(inner)
    elif ext % (lanes // 2) == 0:
        _, vec = sch.split(inner, [None, lanes // 2])
        sch.vectorize(vec)
    else:
        return False
    return True


def parallel_outer(sch: s_tir.Schedule, block, lanes: int, parallel: bool = True) -> None:
    """Vectorise the innermost loop and parallelise the fused outer loops of a root-level block."""
    loops = sch.get_loops(block)
    if not loops:
        return
    n_loops = len(loops)
    vectorized = vectorize_innermost(sch, block, lanes)
    loops = sch.get_loops(block)
    outer = loops[: n_loops - 1] if vectorized or n_loops > 1 else loops
    if not outer:
        return
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if parallel:
        sch.parallel(fused)


class CpuRule(ScheduleRule):
    """A schedule rule for LLVM targets that declines (returns None) where its pattern does not
    match: ``_apply(func)`` returns a schedule or None, and any error in it means "not this
    pattern", leaving the function to the next rule."""

    def __init__(self, lanes: int = 16, parallel: bool = True):
        self.lanes = lanes
        self.parallel = parallel

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not is_llvm(target):
            return None
        try:
            return self._apply(func)
        except Exception:  # not this pattern: leave the function to other rules
            return None

    def _apply(self, func):
        raise NotImplementedError


def normalized(func: tirx.PrimFunc):
    """(schedule, block infos) of ``func`` after dlight's normalisation; None when it has no blocks."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    return (sch, infos) if infos else None
