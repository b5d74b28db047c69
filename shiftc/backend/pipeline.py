"""The Relax compilation pipeline shiftc runs for each target.

CPU (LLVM): TVM's CPU pipeline (library dispatch -> legalize -> fuse -> lower -> finalize) with
shiftc's rule-based schedules (``shiftc.backend.schedules``) applied to the fused TIR functions
before lowering: a register-blocked matmul (symbolic M: decode and prefill share one function,
fused epilogues kept), row reductions (norms; a last-axis float32 softmax is replaced before
legalisation by a hand-written row-softmax PrimFunc, see ``schedules/softmax.py``) and injective
ops, all vectorised for the target ISA and parallelised over TVM's runtime thread pool. No tuning
run is needed.

Functions no rule matches keep TVM's default (serial, scalar) lowering. ``after_schedule`` (a
callable IRModule -> IRModule) runs right after the rules: ``compile.py`` counts such functions
there (``schedules.unscheduled_functions``) and the tests require none. ``fuse=False`` is the
same pipeline without operator fusion, for graphs whose data-dependent shapes defeat FuseOps
(``compile.py``'s fallback): the rules then schedule every single-op function.
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


def _module_pass(fn, name: str):
    import tvm

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        return fn(mod)

    return _pass


def relax_pipeline(spec: TargetSpec, after_schedule=None, fuse: bool = True):
    """The Relax pipeline for ``spec``. CPU targets only: ``after_schedule(mod) -> mod`` runs after
    the schedule rules; ``fuse=False`` leaves out operator fusion (FuseOps, FuseTIR)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    target = spec.tvm_target()
    if target.kind.name != "llvm":
        return relax.get_default_pipeline(target)

    @tvm.transform.module_pass(opt_level=0, name="shiftc.cpu_pipeline")
    def _pipeline(mod, _ctx):
        with target:
            legalize = cpu_generic.legalize_passes(target)
            if not fuse:
                legalize = [p for p in legalize if p.info.name not in ("FuseOps", "FuseTIR")]
            seq = tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(target)
                + [_fast_math_pass(spec)]
                + legalize
                + [_cpu_schedule_pass(spec)]
                + ([_module_pass(after_schedule, "shiftc.after_schedule")] if after_schedule else [])
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
