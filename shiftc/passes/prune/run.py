"""The pruning step of the compress pipeline: analyze → calibrate → prune → N:M → check.

Used by :mod:`shiftc.passes.compress` (``shiftc compress --prune/--nm``) and the benchmarks.
"""

from __future__ import annotations

import onnx

from ...errors import UsageError
from ...progress import step
from .calib import calibration_feeds, collect_norms
from .nm import apply_nm
from .prune import PruneConfig, PrunePass


def _norms(model, pp: PrunePass, info, calib, model_path: str, threads: int | None, means=None) -> dict:
    if calib is not None and calib.corpus == "none":
        raise UsageError("--prune-criterion activation / --nm need calibration data; --calib none was given "
                         "(use --prune-criterion magnitude, or --calib wikipedia)")
    kw = {} if calib is None else dict(corpus=calib.corpus, windows=calib.windows, window=calib.window,
                                       tokenizer=calib.tokenizer)
    feeds = calibration_feeds(model, model_path=model_path, **kw)
    tensors = pp.calibration_tensors(info)
    with step(f"activation norms ({len(feeds)} samples, {len(tensors)} layer inputs)"):
        return collect_norms(model, tensors, feeds, threads=threads, means=means)


def prune_model(model: onnx.ModelProto, cfg: PruneConfig, calib=None, *, model_path: str = "the model",
                threads: int | None = None, scores: dict | None = None) -> tuple[onnx.ModelProto, dict]:
    """Prune ``model`` (structured, then N:M if ``cfg.nm``); returns (new model, report)."""
    pp = PrunePass(cfg)
    report: dict = {}
    if cfg.ratio > 0:
        with step("dependency analysis"):
            info, groups = pp.analyze(model)
        means: dict = {}
        norms = _norms(model, pp, info, calib, model_path, threads, means) if cfg.criterion == "activation" else None
        with step(f"pruning {cfg.ratio:.0%} ({cfg.criterion}, {cfg.budget})"):
            result = pp(model, info=info, groups=groups, norms=norms, scores=scores, means=means or None)
        model, report = result.model, result.report
    if cfg.nm:
        from .groups import GraphInfo

        info = GraphInfo(model)
        norms = _norms(model, pp, info, calib, model_path, threads) if cfg.criterion == "activation" else None
        with step(f"N:M sparsity {cfg.nm}"):
            model, report["nm"] = apply_nm(model, cfg.nm, norms=norms, info=info)
    try:
        onnx.checker.check_model(model, full_check=model.ByteSize() < 2**31 - 1)
    except onnx.checker.ValidationError as e:  # a bug in the pass, not the user's input
        raise RuntimeError(f"pruning produced an invalid model: {e}") from e
    return model, report
