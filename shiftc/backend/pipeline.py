"""The Relax compilation pipeline shiftc runs for each target.

CPU (LLVM): TVM's CPU pipeline (library dispatch -> legalize -> fuse -> lower -> finalize) with
the rule-based schedules of ``tvm.s_tir.dlight`` applied to the fused TIR functions before
lowering: GEMV (matrix-vector products: decode-time MatMuls) and Reduction (norms, softmax
statistics), which vectorise and parallelise the innermost loops. Functions no rule matches keep
TVM's default lowering. No tuning run is needed.
"""

from __future__ import annotations

from ..targets import TargetSpec


def _cpu_schedule_pass():
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())


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
                + cpu_generic.legalize_passes(target)
                + [_cpu_schedule_pass()]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
