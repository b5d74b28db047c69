"""The binarize pass: constant-weight MatMul / Gemm -> ``ai.shiftc::FdbMatMul`` (graph surgery only).

Targets are those of every weight pass (shiftc/passes/shiftadd.py, :meth:`LayerPass.match`):
``MatMul`` with a constant 2-D weight, the tied LM head ``MatMul(h, Transpose(E))`` and ``Gemm``
(bias kept as a standard ``Add``); ``lm_head`` and ``skip`` work the same way. Each target becomes

    FdbMatMul(x, <prefix>.fdb_planes, <prefix>.fdb_scales, <prefix>.fdb_offsets)

with ``bits`` 2 (mode ``fdb``) or 1 (mode ``1bit``); the weights are fitted by shiftc/passes/fdb.py
(GPTQ-compensated when a Hessian H = XᵀX of the layer input is given). Nodes and initializers left
without consumers are removed, the op's function body is added (so ONNX Runtime runs the model),
and ``metadata_props["shiftc.compression"]`` records the pass, mode, group and per-layer bits per
weight (scales and offsets included).

``shiftc compress --binarize`` runs it through the one compress pipeline (shiftc/passes/compress.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .. import options as opts
from ..options import option
from ..progress import Counter
from . import bcq, fdb, ops, uniform
from .distill import DistillFields, validate_fields
from .shiftadd import (LayerPass, PassResult, ShiftAddPass, Target, embedding_tables, finish_rewrite, replacement_nodes,
                       summarize)

OP = ops.FDB_MATMUL.name
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


class BinarizePass(LayerPass):
    """Replace constant-weight MatMul/Gemm by FdbMatMul. Returns a new model; the input is unchanged."""

    name = "binarize"
    config_class = BinarizeConfig

    def quantize(self, t: Target, w: np.ndarray, h: np.ndarray | None) -> fdb.FdbResult:
        """The fit of one target's weight W [N, K] with H = XᵀX of its input (None: data-free)."""
        c = self.config
        return fdb.quantize_gptq(w, h, c.mode, c.group, damp=c.damp, act_order=c.act_order, iters=c.iters)

    def rewrite(self, out, targets, skipped, inits, by_id, hessians, results) -> PassResult:
        cfg = self.config
        g = out.graph
        layers, new_inits, replacements = {}, [], {}
        progress = Counter("binarize", len(targets))
        for t in targets:
            w = ShiftAddPass.weight(inits, t)  # [N, K]
            h = None if hessians is None else hessians.get(t.x)
            r = results[t.name] if t.name in results else self.quantize(t, w, h)
            prefix = t.name[: -len(".weight.T")] if t.name.endswith(".weight.T") else t.name
            names = [prefix + x for x in ops.FDB_MATMUL.initializers]
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
        ops.add_functions(out, [ops.Q_GATHER.name] if tables else [])
        return PassResult(out, True, {**summary, "layers": layers, "skipped": skipped})


dequantized_copy = ops.dequantized_copy  # FdbMatMul -> MatMul(x, Ŵᵀ) (shiftc/passes/ops/)
