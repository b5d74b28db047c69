"""Injective PrimFuncs (elementwise, broadcast, transpose, reshape, concat, gather).

All blocks but the last are inlined; the last block's innermost loop is vectorised when its extent
is static, and the remaining loops are fused into one parallel loop (a serial one for functions
of few elements per token: common.SERIAL_ELEMENTS). A function with several outputs (``split``)
keeps one such loop nest per output block.
"""

from __future__ import annotations

from .common import CpuRule, normalized, parallel_outer, worth_parallel


class Injective(CpuRule):
    def _apply(self, func):
        got = normalized(func)
        if got is None or any(not bi.is_injective() for bi in got[1]):
            return None
        sch, infos = got
        outputs = list(sch.mod["main"].params)  # buffers (TVM 0.27: no separate buffer_map)
        nests = []
        for bi in infos[:-1]:
            writes = sch.get(bi.block_rv).writes
            if any(w.source.same_as(o) for w in writes for o in outputs):
                nests.append(bi.block_rv)  # writes a function output: cannot be inlined
            else:
                sch.compute_inline(bi.block_rv)
        parallel = self.parallel and worth_parallel(func)
        for block in nests + [infos[-1].block_rv]:
            parallel_outer(sch, block, self.lanes, parallel)
        return sch
