"""The Relax compilation pipeline shiftc runs for each target.

CPU (LLVM): TVM's CPU pipeline (library dispatch -> legalize -> fuse -> lower -> finalize) with
shiftc's rule-based schedules (``shiftc.backend.schedules``) applied to the fused TIR functions
before lowering: a register-blocked matmul (symbolic M: decode and prefill share one function,
fused epilogues kept), row reductions (norms; a last-axis float32 softmax is replaced before
legalisation by a hand-written row-softmax PrimFunc, see ``schedules/softmax.py``) and injective
ops, all vectorised for the target ISA and parallelised over TVM's runtime thread pool. Functions
no rule matches keep TVM's default lowering. No tuning run is needed.
"""

from __future__ import annotations

from ..targets import TargetSpec


def _cpu_schedule_pass(spec: TargetSpec):
    from .schedules import cpu_schedule_pass

    return cpu_schedule_pass(spec.isa)


def _fast_math_pass(spec: TargetSpec):
    from .schedules import VECTOR_LANES
    from .schedules.fast_math import fast_math_pass

    return fast_math_pass(VECTOR_LANES.get(spec.isa, 4))


def relax_pipeline(spec: TargetSpec):
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    target = spec.tvm_target()
    if target.kind.name != "llvm":
        return relax.get_default_pipeline(target)

    @tvm.transform.module_pass(opt_level=0, name="shiftc.cpu_pipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(target)
                + [_fast_math_pass(spec)]
                + cpu_generic.legalize_passes(target)
                + [_cpu_schedule_pass(spec)]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
