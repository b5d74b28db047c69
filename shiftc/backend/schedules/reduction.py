"""Reductions with symbolic extents: row reductions (softmax, RMSNorm / mean-based norms) and
single reductions with spatial outputs (pooling windows, a lone ReduceSum/ReduceMax).

``RowReduction`` wraps ``tvm.s_tir.dlight.cpu.Reduction`` (parallel over rows, every block
computed at the row, injective blocks vectorised) with the vector width taken from shiftc's
target ISA. It needs a reduction followed by an injective block; ``SpatialReduction`` takes the
rest: one reduction block (injective producers inlined, consumers computed at its rows)::

    parallel for (spatial axes but the innermost):
        for (reduction axes):                     # a pooling window, a reduced outer axis
            vector for (innermost spatial axis):  # static, and the inputs' last index follows it
        epilogue (vectorised)

otherwise (a reduction along the inputs' last axis, a symbolic innermost extent) the reduction
stays innermost under one parallel loop over all spatial axes.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu import Reduction

from .common import CpuRule, extent_of, is_llvm, normalized, vars_in, vectorize_innermost, worth_parallel


class RowReduction(Reduction):
    def __init__(self, lanes: int = 16):
        super().__init__()
        self.lanes = lanes

    def apply(self, func, target, tunable):
        if not is_llvm(target) or not isinstance(func, tirx.PrimFunc):
            return None
        try:
            if _single_row(func):
                # TVM's rule would parallelise the epilogue's axis and recompute the whole
                # reduction for each of its elements (a static [1, 1, H] norm: H times the work);
                # SpatialReduction computes it once
                return None
            return super().apply(func, target, tunable)
        except Exception:
            return None


def _single_row(func) -> bool:
    """Whether the reduction blocks of ``func`` compute one row (static spatial extents, all 1)."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    reductions = [bi for bi in infos or [] if not bi.is_injective()]

    def rows(bi) -> int | None:
        n = 1
        for kind, ext in zip(bi.dom_kind(), bi.dom()):
            if kind == "S":
                if isinstance(ext, tirx.IntImm):
                    ext = ext.value
                if not isinstance(ext, int):
                    return None
                n *= ext
        return n

    return bool(reductions) and all(rows(bi) == 1 for bi in reductions)


class SpatialReduction(CpuRule):
    """One reduction block ``out[s...] = op(out[s...], f(in, s..., r...))`` (all spatial axes
    first, then the reduction axes), with injective producers and consumers."""

    def _apply(self, func):
        got = normalized(func)
        if got is None:
            return None
        sch, infos = got
        reductions = [i for i, bi in enumerate(infos) if not bi.is_injective()]
        if len(reductions) != 1:
            return None
        r_idx = reductions[0]
        main = infos[r_idx]
        kinds = main.dom_kind()
        n_s = len(kinds) - len(kinds.lstrip("S"))
        if n_s == 0 or set(kinds[n_s:]) != {"R"}:
            return None
        for bi in infos[:r_idx]:
            sch.compute_inline(bi.block_rv)
        consumers = [bi.block_rv for bi in infos[r_idx + 1:]]
        for b in consumers[:-1]:
            sch.compute_inline(b)
        last = consumers[-1] if consumers else None

        block = main.block_rv
        loops = sch.get_loops(block)
        spatial, reduce = loops[:n_s], loops[n_s:]
        inner = spatial[-1]
        inner_ext = extent_of(sch, inner)
        # vectorise the innermost spatial axis when every input's innermost index follows it (a
        # pooling window, a reduction over an outer axis); a reduction along the inputs' last
        # axis keeps the reduction innermost instead (contiguous reads, no gathers)
        stmt = sch.get(block)
        inner_var = stmt.iter_vars[n_s - 1].var
        out = stmt.writes[0].source
        inputs = [r for r in stmt.reads if not r.source.same_as(out)]
        vector_inner = (
            n_s > 1 and isinstance(inner_ext, int) and inner_ext >= 2 and len(inputs) > 0
            and all(inner_var in vars_in([r.region[-1].min]) for r in inputs)
        )
        if vector_inner:
            outer = spatial[:-1]
            sch.reorder(*outer, *reduce, inner)
        else:
            outer = spatial
        tile = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if self.parallel and worth_parallel(func):
            sch.parallel(tile)
        if last is not None:
            sch.reverse_compute_at(last, tile, preserve_unit_loops=True)
        if vector_inner:
            # vectorise while the block is still a reduction block (with its init), then move the
            # init out of the reduction loops (it keeps the vectorised inner loop)
            vectorize_innermost(sch, block, self.lanes)
            sch.decompose_reduction(block, reduce[0])
        if last is not None:
            vectorize_innermost(sch, last, self.lanes)
        return sch
