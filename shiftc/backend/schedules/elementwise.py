"""Injective PrimFuncs (elementwise, broadcast, transpose, reshape, concat, gather).

All blocks but the last are inlined; the last block's innermost loop is vectorised when its extent
is static, and the remaining loops are fused into one parallel loop.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule

from .common import is_llvm, parallel_outer


class Injective(ScheduleRule):
    def __init__(self, lanes: int = 16, parallel: bool = True):
        self.lanes = lanes
        self.parallel = parallel

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not is_llvm(target):
            return None
        try:
            return self._apply(func)
        except Exception:
            return None

    def _apply(self, func):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or any(not bi.is_injective() for bi in infos):
            return None
        for bi in infos[:-1]:
            sch.compute_inline(bi.block_rv)
        parallel_outer(sch, infos[-1].block_rv, self.lanes, self.parallel)
        return sch
