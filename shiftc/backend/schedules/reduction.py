"""Row reductions (softmax, RMSNorm / mean-based norms) with symbolic extents.

Wraps ``tvm.s_tir.dlight.cpu.Reduction`` (parallel over rows, every block computed at the row,
injective blocks vectorised) with the vector width taken from shiftc's target ISA.
"""

from __future__ import annotations

from tvm.s_tir.dlight.cpu import Reduction

from .common import is_llvm


class RowReduction(Reduction):
    def __init__(self, lanes: int = 16):
        super().__init__()
        self.lanes = lanes

    def apply(self, func, target, tunable):
        if not is_llvm(target):
            return None
        try:
            return super().apply(func, target, tunable)
        except Exception:
            return None
