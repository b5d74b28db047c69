"""The compress pipeline shared by ``shiftc.compress`` and ``shiftc compress``.

    load (safe) -> [prune: structured / N:M, shiftc/passes/prune] -> match layers -> calibrate (H = XᵀX per layer input, ONNX Runtime on the
    calibration split) -> shift-add pass (BCQ + power-of-two scales inside GPTQ) -> [distillation of
    the scales against the fp32 PyTorch model, shiftc/passes/distill.py] -> onnx.checker -> atomic save
    With --bits-budget, the per-layer bits come from shiftc/passes/mixed_precision (sensitivity ->
    integer program) before the shift-add pass, and a report is written beside the output.

Returns a JSON-able report: per layer shape, bits, bits per weight, relative weight error and
relative output error on the calibration data; sizes before and after; timings.
"""

from __future__ import annotations

import os
import time

import onnx

from ..errors import BadInputError
from ..frontend.onnx_io import load_model, save_model
from .recipe import CompressConfig, validate
from . import ops
from .shiftadd import ShiftAddPass
from ..progress import log, step


def compress(src: str | os.PathLike, output: str | os.PathLike, config: CompressConfig) -> dict:
    src, output = os.fspath(src), os.fspath(output)
    validate(config)
    if config.threads:
        import torch

        torch.set_num_threads(int(config.threads))
    t0 = time.perf_counter()
    model = load_model(src)
    prune_report = None
    if config.prune is not None:  # structured pruning / N:M first (shiftc/passes/prune)
        from .prune.run import prune_model

        model, prune_report = prune_model(model, config.prune, config.calib, model_path=src, threads=config.threads)
        if config.shiftadd is None and getattr(config, "binarize", None) is None:
            save_model(model, output)
            log(f"wrote {output}")
            return {"path": output, "source": src, "size_bytes": os.path.getsize(output),
                    "source_size_bytes": os.path.getsize(src), "seconds": round(time.perf_counter() - t0, 1),
                    "prune": prune_report}
    if getattr(config, "binarize", None) is not None:  # binarize pass instead (shiftc/passes/binarize.py)
        from .binarize import run as run_binarize

        return run_binarize(model, src, output, config, t0, prune_report)
    if config.threads and not config.shiftadd.workers:  # --threads bounds the quantizer's processes too
        from dataclasses import replace

        config = replace(config, shiftadd=replace(config.shiftadd, workers=int(config.threads)))
    sa = ShiftAddPass(config.shiftadd)
    targets, skipped = sa.match(model)
    if not targets:
        raise BadInputError(f"'{src}': no MatMul/Gemm with a constant weight to compress "
                            f"({len(skipped)} skipped: {[r for _, r in skipped][:3]})")
    hessians, results = None, None
    calib_windows = 0
    if config.calib.corpus != "none":
        from .calibration import calibration_windows, collect_hessians

        c = config.calib
        ids = calibration_windows(model, corpus=c.corpus, split=c.split, windows=c.windows, window=c.window,
                                  tokenizer=c.tokenizer, model_path=src)
        calib_windows = len(ids)
        with step(f"calibration ({len(ids)} windows x {ids.shape[1]} tokens, {len({t.x for t in targets})} inputs)"):
            if c.sequential > 1 and not config.mixed_precision.enabled:  # quantizes while calibrating
                from .calibration import quantize_sequential

                results, hessians = quantize_sequential(model, targets, ids, sa.quantize, stages=c.sequential,
                                                        threads=config.threads)
            else:
                hessians = collect_hessians(model, [t.x for t in targets], ids, threads=config.threads)
    plan = None
    if config.mixed_precision.enabled:  # per-layer bits under a bits or size budget (passes/mixed_precision)
        from dataclasses import replace

        from .mixed_precision.plan import make_plan

        plan = make_plan(model, targets, hessians, config.shiftadd, config.mixed_precision, src=src,
                         tokenizer=config.calib.tokenizer)
        sa = ShiftAddPass(replace(config.shiftadd, layer_bits=plan["layer_bits"]))
        results = plan.pop("results", None) or results  # from --mp-cache: not quantized again
    with step(f"shift-add on {len(targets)} layers"):
        result = sa(model, hessians, results=results)
    del hessians
    distill_report = None
    if config.shiftadd.distill_enabled():  # fine-tune the scales against the fp32 model (passes/distill.py)
        from .distill import run_configured

        distill_report = run_configured(model, result.model, config.shiftadd, config.calib, src)
    del model
    try:
        onnx.checker.check_model(result.model, full_check=result.model.ByteSize() < 2**31 - 1)
    except onnx.checker.ValidationError as e:  # a bug in the pass, not the user's input
        raise RuntimeError(f"shift-add produced an invalid model: {e}") from e
    save_model(result.model, output)
    log(f"wrote {output}")
    rep = result.report
    out = {"path": output, "source": src, "size_bytes": os.path.getsize(output), "source_size_bytes": os.path.getsize(src),
           "calibration": {"corpus": config.calib.corpus, "windows": calib_windows, "window": config.calib.window},
           "seconds": round(time.perf_counter() - t0, 1), **rep, "weights": ops.bytes_by_kind(result.model),
           **({"prune": prune_report} if prune_report is not None else {}),
           **({"distill": distill_report} if distill_report is not None else {})}
    if plan is not None:  # plan summary, perplexity before/after if asked, OUT.report.json/.html
        from .mixed_precision.plan import finish

        out["mixed_precision"] = finish(out, plan, config.mixed_precision, threads=config.threads)
    return out
