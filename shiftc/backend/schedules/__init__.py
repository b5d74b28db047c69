"""Rule-based CPU schedules for the fused TIR functions of a shiftc model (no tuning).

Each rule is a ``tvm.s_tir.dlight`` ScheduleRule: it inspects one PrimFunc and either returns a
schedule or ``None`` (not my pattern); ``ApplyDefaultSchedule`` tries the rules in order. All of
them accept symbolic extents (``batch``, ``seq``, ``past + seq``), so one compiled function serves
both prefill and decode. See docs/architecture.md, "CPU schedules".
"""

from __future__ import annotations

from .elementwise import Injective
from .matmul import Matmul
from .opaque import Prescheduled
from .packing import pack_matmul_weights_pass
from .reduction import RowReduction, SpatialReduction

VECTOR_LANES = {"avx512": 16, "avx2": 8, "sse2": 4, "neon": 4}
# (MR rows, NR / lanes vectors) of the matmul register tile: MR * nvec accumulators + nvec
# B vectors + 1 broadcast must fit the vector register file (32 on AVX-512, 16 on AVX2/SSE/NEON*),
# and the tile must stay under 1024 bytes (TVM's stack-allocation limit, see matmul.py).
MATMUL_TILE = {"avx512": (6, 2), "avx2": (4, 3), "sse2": (4, 3), "neon": (4, 4)}
# vectors per row of the one-row (M == 1, decode) kernel's n tile
GEMV_NVEC = {"avx512": 8, "avx2": 8, "sse2": 8, "neon": 8}


def cpu_rules(isa: str):
    lanes = VECTOR_LANES.get(isa, 4)
    mr, nvec = MATMUL_TILE.get(isa, (4, 2))
    return [
        Matmul(lanes=lanes, mr=mr, nvec=nvec, gemv_nvec=GEMV_NVEC.get(isa, 8)),
        RowReduction(lanes=lanes),
        SpatialReduction(lanes=lanes),
        Injective(lanes=lanes),
        Prescheduled(),
    ]


#: the attribute ``ApplyDefaultSchedule`` (TVM 0.27) sets on a function a rule scheduled; a
#: hand-written PrimFunc marked with the pre-0.27 spelling ``tir.is_scheduled`` counts as scheduled
#: too (its author wrote the loops), although TVM's rules do not skip it
SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled")


def unscheduled_functions(mod) -> list[str]:
    """Names of the TIR PrimFuncs in ``mod`` that no schedule rule claimed (sorted).

    Run after :func:`cpu_schedule_pass`: such a function keeps TVM's default lowering (serial
    scalar loops). Functions that call shiftc's C kernels (``shiftc_ops.EXTERN_ATTR``) are written
    scheduled and do not count.
    """
    from tvm import tirx

    from ..shiftc_ops import EXTERN_ATTR

    names = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        attrs = func.attrs if func.attrs is not None else {}
        if EXTERN_ATTR in attrs and bool(attrs[EXTERN_ATTR]):
            continue
        if any(a in attrs and bool(attrs[a]) for a in SCHEDULED_ATTRS):
            continue
        names.append(gv.name_hint)
    return sorted(names)


def cpu_schedule_pass(isa: str):
    """Weight packing for constant-B matmuls, then the rules on every unscheduled PrimFunc."""
    import tvm
    from tvm.s_tir import dlight as dl

    rules = cpu_rules(isa)
    return tvm.transform.Sequential([pack_matmul_weights_pass(rules[0]), dl.ApplyDefaultSchedule(*rules)])


__all__ = ["Matmul", "RowReduction", "SpatialReduction", "Injective", "Prescheduled", "cpu_rules", "cpu_schedule_pass", "unscheduled_functions",
           "VECTOR_LANES"]
