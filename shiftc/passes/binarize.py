"""The binarize pass: constant-weight MatMul / Gemm -> ``ai.shiftc::FdbMatMul`` (graph surgery only).

Targets are those of the shift-add pass (shiftc/passes/shiftadd.py, :meth:`ShiftAddPass.match`):
``MatMul`` with a constant 2-D weight, the tied LM head ``MatMul(h, Transpose(E))`` and ``Gemm``
(bias kept as a standard ``Add``); ``lm_head`` and ``skip`` work the same way. Each target becomes

    FdbMatMul(x, <prefix>.fdb_planes, <prefix>.fdb_scales, <prefix>.fdb_offsets)

with ``bits`` 2 (mode ``fdb``) or 1 (mode ``1bit``); the weights are fitted by shiftc/passes/fdb.py
(GPTQ-compensated when a Hessian H = XᵀX of the layer input is given). Nodes and initializers left
without consumers are removed, the op's function body is added (so ONNX Runtime runs the model),
and ``metadata_props["shiftc.compression"]`` records the pass, mode, group and per-layer bits per
weight (scales and offsets included).

:func:`run` is the pipeline step behind ``shiftc compress --binarize`` (called from
shiftc/passes/compress.py): match -> calibrate -> pass -> checker -> atomic save.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .. import options as opts
from ..options import option
from ..progress import Counter
from . import bcq, fdb, ops, uniform
from .distill import DistillFields, run_configured, validate_fields
from .shiftadd import (PassResult, ShiftAddConfig, ShiftAddPass, Target, _node_id, embedding_tables, finish_rewrite,
                       replacement_nodes, summarize)

OP = "FdbMatMul"
MODES = tuple(fdb.MODES)


@dataclass
class BinarizeConfig(DistillFields):  # + distill_* keys: distillation of the scales/offsets afterwards
    mode: str = option("fdb", flag="--binarize", kw="binarize", choices=MODES,
                       help="binarize instead of shift-add: fdb = 2 {{0,1}} planes with float16 scales + offset "
                            "(flexible dual binarization), 1bit = one sign plane with scale + mean")
    group: int = option(128, flag="--group", parse=opts.group, help="input columns per scale (default {default})")
    act_order: bool = option(False, flag="--act-order", help="GPTQ activation ordering (binarize default: off)")
    damp: float = 0.01
    iters: int = 8
    lm_head: bool = option(True, flag="--shiftadd-lm-head", kw="lm_head", help="binarize the LM head too")
    skip: list[str] = option(kw="skip", default_factory=list, help="globs of layer names left in fp32")
    embedding_bits: int = 4  # token embedding: a table of its own on a uniform grid (QGather); 0: fp32
    embedding_group: int = 32


def validate(cfg: BinarizeConfig, bad) -> None:
    """Check values; ``bad(flag, message)`` raises the caller's usage error."""
    if cfg.mode not in MODES:
        bad("--binarize", f"must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if not isinstance(cfg.group, int) or cfg.group < 32 or cfg.group % 32:
        bad("--group", f"must be a positive multiple of 32, got {cfg.group!r}")
    if not 0 <= float(cfg.damp) < 10:
        bad("binarize.damp", f"must be in [0, 10), got {cfg.damp!r}")
    if not isinstance(cfg.iters, int) or cfg.iters < 0:
        bad("binarize.iters", f"must be an integer >= 0, got {cfg.iters!r}")
    if cfg.embedding_bits not in (0, *uniform.BITS):
        bad("binarize.embedding_bits", f"must be 0 (fp32 table) or one of {uniform.BITS}, got {cfg.embedding_bits!r}")
    if not isinstance(cfg.embedding_group, int) or cfg.embedding_group < 1:
        bad("binarize.embedding_group", f"must be a positive integer, got {cfg.embedding_group!r}")
    validate_fields(cfg, bad)


class BinarizePass:
    """Replace constant-weight MatMul/Gemm by FdbMatMul. Returns a new model; the input is unchanged."""

    name = "binarize"

    def __init__(self, config: BinarizeConfig | None = None):
        self.config = config or BinarizeConfig()

    def match(self, model: onnx.ModelProto) -> tuple[list[Target], list[tuple[str, str]]]:
        """(targets, skipped [(node, reason)]): the shift-add pass's matching."""
        c = self.config
        return ShiftAddPass(ShiftAddConfig(lm_head=c.lm_head, skip=list(c.skip))).match(model)

    def quantize(self, w: np.ndarray, h: np.ndarray | None) -> fdb.FdbResult:
        c = self.config
        return fdb.quantize_gptq(w, h, c.mode, c.group, damp=c.damp, act_order=c.act_order, iters=c.iters)

    def __call__(self, model: onnx.ModelProto, hessians: dict[str, np.ndarray] | None = None,
                 results: dict[str, fdb.FdbResult] | None = None) -> PassResult:
        """``results`` ({layer name: FdbResult}) are used as given instead of fitting."""
        cfg = self.config
        results = results or {}
        targets, skipped = self.match(model)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        if not targets:
            return PassResult(out, False, {"layers": {}, "skipped": skipped})
        g = out.graph
        inits = {t.name: t for t in g.initializer}
        by_id = {_node_id(n): i for i, n in enumerate(g.node)}
        layers, new_inits, replacements = {}, [], {}
        progress = Counter("binarize", len(targets))
        for t in targets:
            w = ShiftAddPass.weight(inits, t)  # [N, K]
            h = None if hessians is None else hessians.get(t.x)
            r = results[t.name] if t.name in results else self.quantize(w, h)
            prefix = t.name[: -len(".weight.T")] if t.name.endswith(".weight.T") else t.name
            names = [f"{prefix}.fdb_planes", f"{prefix}.fdb_scales", f"{prefix}.fdb_offsets"]
            new_inits += [numpy_helper.from_array(r.packed_planes(), names[0]),
                          numpy_helper.from_array(r.scales, names[1]), numpy_helper.from_array(r.offsets, names[2])]
            replacements[by_id[t.node]] = replacement_nodes(g.node[by_id[t.node]], t, OP, "fdb", names, bits=r.bits,
                                                            group_size=r.group, in_features=w.shape[1])
            w_hat = r.dequantize()
            entry = {"shape": list(w.shape), "bits": r.bits, "group": r.group, "mode": r.mode,
                     "bits_per_weight": fdb.bits_per_weight(r.bits, r.group),
                     "rel_weight_error": bcq.relative_weight_error(w, w_hat)}
            if h is not None:
                entry["rel_output_error"] = bcq.relative_output_error(w, w_hat, h)
            layers[t.name] = entry
            progress.update(extra=t.name)
        tables = embedding_tables(g, inits, replacements, new_inits, cfg.embedding_bits, cfg.embedding_group)
        summary = summarize("binarize", OP, layers, mode=cfg.mode, group=cfg.group)
        if tables:
            summary["embedding"] = tables
        finish_rewrite(out, replacements, new_inits, OP, summary)
        ops.add_functions(out, ["QGather"] if tables else [])
        return PassResult(out, True, {**summary, "layers": layers, "skipped": skipped})


dequantized_copy = ops.dequantized_copy  # FdbMatMul -> MatMul(x, Ŵᵀ) (shiftc/passes/ops.py)


def run(model: onnx.ModelProto, src: str, output: str, config, t0: float, prune_report: dict | None = None) -> dict:
    """The compress pipeline with the binarize pass (``config``: recipe.CompressConfig with
    ``binarize`` set). Returns the report: per layer shape, bits, bits per weight, errors; sizes."""
    from ..errors import BadInputError
    from ..frontend.onnx_io import save_model
    from ..progress import log, step

    bp = BinarizePass(config.binarize)
    targets, skipped = bp.match(model)
    if not targets:
        raise BadInputError(f"'{src}': no MatMul/Gemm with a constant weight to binarize "
                            f"({len(skipped)} skipped: {[r for _, r in skipped][:3]})")
    hessians, calib_windows = None, 0
    if config.calib.corpus != "none":
        from .calibration import calibration_windows, collect_hessians

        c = config.calib
        ids = calibration_windows(model, corpus=c.corpus, split=c.split, windows=c.windows, window=c.window,
                                  tokenizer=c.tokenizer, model_path=src)
        calib_windows = len(ids)
        with step(f"calibration ({len(ids)} windows x {ids.shape[1]} tokens, {len({t.x for t in targets})} inputs)"):
            hessians = collect_hessians(model, [t.x for t in targets], ids, threads=config.threads)
    with step(f"binarize ({config.binarize.mode}) on {len(targets)} layers"):
        result = bp(model, hessians)
    del hessians
    b = config.binarize
    distill_report = None
    if b.distill_enabled():  # fine-tune scales/offsets against the fp32 model (shiftc/passes/distill.py)
        distill_report = run_configured(model, result.model, b, config.calib, src)
    del model
    try:
        onnx.checker.check_model(result.model, full_check=result.model.ByteSize() < 2**31 - 1)
    except onnx.checker.ValidationError as e:  # a bug in the pass, not the user's input
        raise RuntimeError(f"binarize produced an invalid model: {e}") from e
    save_model(result.model, output)
    log(f"wrote {output}")
    return {"path": output, "source": src, "size_bytes": os.path.getsize(output), "source_size_bytes": os.path.getsize(src),
            "calibration": {"corpus": config.calib.corpus, "windows": calib_windows, "window": config.calib.window},
            "seconds": round(time.perf_counter() - t0, 1), **result.report,
            **({"prune": prune_report} if prune_report is not None else {}),
            **({"distill": distill_report} if distill_report is not None else {})}
