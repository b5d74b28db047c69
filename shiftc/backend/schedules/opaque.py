"""PrimFuncs that arrive already scheduled by hand: TOPI's ir_builder kernels.

``DispatchSortScan`` lowers cumsum / cumprod (the decoder's ``cumsum(attention_mask)``), sort,
argsort and top-k to TOPI kernels written as explicit loops in one opaque block, with their own
``T.parallel`` loops (cumsum: one sequential scan per row, rows in parallel). No schedule
primitive applies to an opaque block, and none is needed: this rule claims such a function as is,
so it is not counted as a fallback. A function of opaque blocks with no parallel loop is left
unclaimed (it would run serially).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule

from .common import is_llvm


def _walk(stmt, visit) -> None:
    """Pre-order walk of a TIR statement tree (TVM 0.27 exposes no statement visitor to Python)."""
    if stmt is None:
        return
    visit(stmt)
    for attr in ("seq",):
        for child in getattr(stmt, attr, None) or []:
            _walk(child, visit)
    for attr in ("body", "block", "init", "then_case", "else_case"):
        child = getattr(stmt, attr, None)
        if isinstance(child, tirx.Stmt):
            _walk(child, visit)


def _opaque_and_parallel(func: tirx.PrimFunc) -> bool:
    from tvm.s_tir.stmt import SBlock

    found = {"parallel": False, "iter_block": False}

    def visit(node):
        if isinstance(node, tirx.For) and node.kind == tirx.ForKind.PARALLEL:
            found["parallel"] = True
        elif isinstance(node, SBlock) and node.name_hint != "root" and len(node.iter_vars) > 0:
            found["iter_block"] = True

    _walk(func.body, visit)
    return found["parallel"] and not found["iter_block"]


class Prescheduled(ScheduleRule):
    """Claims a PrimFunc made only of opaque blocks that already has a parallel loop."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not is_llvm(target):
            return None
        try:
            return s_tir.Schedule(func) if _opaque_and_parallel(func) else None
        except Exception:
            return None
