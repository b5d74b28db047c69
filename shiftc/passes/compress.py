"""The compress pipeline behind ``shiftc.compress`` / ``shiftc compress``, one for every pass:

    load (safe) -> [prune: structured / N:M, shiftc/passes/prune] -> match layers -> calibrate
    (H = XᵀX per layer input, ONNX Runtime on the calibration split) -> [plan: per-layer bits under a
    budget, shiftc/passes/mixed_precision] -> pass (shift-add: BCQ + power-of-two scales inside GPTQ,
    or binarize) -> [distillation against the fp32 PyTorch model, shiftc/passes/distill.py] ->
    onnx.checker -> atomic save [-> mixed-precision report beside the output]

A pass (:class:`~shiftc.passes.shiftadd.ShiftAddPass`, :class:`~shiftc.passes.binarize.BinarizePass`)
offers ``match(model) -> (targets, skipped)``, ``quantize(target, W, H) -> result`` and
``__call__(model, hessians, results=) -> PassResult`` (the rewrite); its config carries the
distill_* keys. Returns a JSON-able report: per layer shape, bits, bits per weight, relative weight
error and relative output error on the calibration data; sizes before and after; timings.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import onnx

from ..errors import BadInputError
from ..frontend.foreign import canonical
from ..frontend.onnx_io import load_model, save_model
from ..progress import log, step
from ..timing import peak_rss_bytes
from . import ops
from .recipe import CompressConfig, validate
from .shiftadd import ShiftAddPass
from .tools import Tools


def compress(src: str | os.PathLike, output: str | os.PathLike, config: CompressConfig, tools: Tools | None = None) -> dict:
    """``tools``: what a latency budget or a report's perplexity needs (shiftc.api passes them)."""
    src, output = os.fspath(src), os.fspath(output)
    validate(config)
    if config.threads:
        import torch

        torch.set_num_threads(int(config.threads))
    t0 = time.perf_counter()
    model = canonical(src, load_model(src))
    prune_report = None
    if config.prune is not None:  # structured pruning / N:M first (shiftc/passes/prune)
        from .prune.run import prune_model

        model, prune_report = prune_model(model, config.prune, config.calib, model_path=src, threads=config.threads)
        if config.shiftadd is None and config.binarize is None:
            _save(model, output)
            return {"path": output, "source": src, "size_bytes": os.path.getsize(output),
                    "source_size_bytes": os.path.getsize(src), "seconds": round(time.perf_counter() - t0, 1),
                    "peak_rss_bytes": peak_rss_bytes(), "prune": prune_report}
    pass_, pass_cfg = _make_pass(config)
    binarize = pass_.name == "binarize"
    targets, skipped = pass_.match(model)
    if not targets:
        raise BadInputError(f"'{src}': no MatMul/Gemm with a constant weight to {'binarize' if binarize else 'compress'} "
                            f"({len(skipped)} skipped: {[r for _, r in skipped][:3]})")
    mp = config.mixed_precision
    hessians, results, calib_windows = _calibrate(model, targets, pass_, config, src, sequential=not mp.enabled)
    plan = None
    if mp.enabled:  # per-layer bits under a bits or size budget (passes/mixed_precision)
        from .mixed_precision.plan import make_plan

        plan = make_plan(model, targets, hessians, pass_cfg, mp, src=src, tokenizer=config.calib.tokenizer, tools=tools,
                         data=config.calib.data)
        pass_ = ShiftAddPass(replace(pass_cfg, layer_bits=plan["layer_bits"]))
        results = plan.pop("results", None) or results  # from --mp-cache: not quantized again
    label = f"binarize ({pass_cfg.mode})" if binarize else "shift-add"
    with step(f"{label} on {len(targets)} layers"):
        result = pass_(model, hessians, results=results)
    del hessians
    distill_report = None
    if pass_cfg.distill_enabled():  # fine-tune the scales against the fp32 model (passes/distill.py)
        from .distill import run_configured

        distill_report = run_configured(model, result.model, pass_cfg, config.calib, src)
    del model
    try:
        onnx.checker.check_model(result.model, full_check=result.model.ByteSize() < 2**31 - 1)
    except onnx.checker.ValidationError as e:  # a bug in the pass, not the user's input
        raise RuntimeError(f"{label} produced an invalid model: {e}") from e
    _save(result.model, output)
    out = {"path": output, "source": src, "size_bytes": os.path.getsize(output), "source_size_bytes": os.path.getsize(src),
           "calibration": {"corpus": config.calib.corpus, "windows": calib_windows, "window": config.calib.window},
           "seconds": round(time.perf_counter() - t0, 1), "peak_rss_bytes": peak_rss_bytes(),
           **result.report, "weights": ops.bytes_by_kind(result.model),
           **({"prune": prune_report} if prune_report is not None else {}),
           **({"distill": distill_report} if distill_report is not None else {})}
    if plan is not None:  # plan summary, perplexity before/after if asked, OUT.report.json/.html
        from .mixed_precision.plan import finish

        out["mixed_precision"] = finish(out, plan, mp, threads=config.threads, tools=tools)
    return out


def _make_pass(config: CompressConfig):
    """(pass, its config): the binarize pass when the config has a binarize section, else shift-add."""
    if config.binarize is not None:
        from .binarize import BinarizePass

        return BinarizePass(config.binarize), config.binarize
    sa = config.shiftadd
    if config.threads and not sa.workers:  # --threads bounds the quantizer's processes too
        sa = replace(sa, workers=int(config.threads))
    return ShiftAddPass(sa), sa


def _calibrate(model, targets, pass_, config: CompressConfig, src: str, *, sequential: bool):
    """(H per layer input or None, results quantized while calibrating or None, windows used).
    ``calib.sequential`` > 1 (and ``sequential``): stages, each stage's H with the earlier ones quantized."""
    c = config.calib
    if c.corpus == "none":
        return None, None, 0
    from .calibration import calibration_windows, collect_hessians

    ids = calibration_windows(model, corpus=c.corpus, split=c.split, windows=c.windows, window=c.window,
                              tokenizer=c.tokenizer, model_path=src, data=c.data)
    with step(f"calibration ({len(ids)} windows x {ids.shape[1]} tokens, {len({t.x for t in targets})} inputs)"):
        if c.sequential > 1 and sequential:  # quantizes while calibrating
            from .calibration import quantize_sequential

            results, hessians = quantize_sequential(model, targets, ids, pass_.quantize, stages=c.sequential,
                                                    threads=config.threads)
            return hessians, results, len(ids)
        return collect_hessians(model, [t.x for t in targets], ids, threads=config.threads), None, len(ids)


def _save(model: onnx.ModelProto, output: str) -> None:
    save_model(model, output)
    log(f"wrote {output}")
