"""The pruning step of the compress pipeline: analyze → calibrate → [LoRA] → prune → N:M → check.

With ``--prune-criterion lorapr``, or ``--recover-steps/--recover-minutes`` after magnitude /
activation, a LoRA fine-tune of the torch model (:mod:`.lora`) runs on the unpruned ONNX model's
export source with the pruned units masked; its merged weights replace the ONNX weights before
the surgery. An image classifier is instead pruned first and the pruned graph itself trained
(:mod:`.recover_image`: Fashion-MNIST, distilled from the unpruned graph).

Used by :mod:`shiftc.passes.compress` (``shiftc compress --prune/--nm``) and the benchmarks.
"""

from __future__ import annotations

import onnx

from ...errors import UsageError
from ...frontend import metadata as md
from ...progress import step
from . import recover_image
from .calib import calibration_feeds, collect_norms
from .nm import apply_nm
from .prune import PruneConfig, PrunePass


def _norms(model, pp: PrunePass, info, calib, model_path: str, threads: int | None, means=None) -> dict:
    if calib is not None and calib.corpus == "none":
        raise UsageError("--prune-criterion activation / --nm need calibration data; --calib none was given "
                         "(use --prune-criterion magnitude, or --calib wikipedia)")
    kw = {} if calib is None else dict(corpus=calib.corpus, windows=calib.windows, window=calib.window,
                                       tokenizer=calib.tokenizer, data=getattr(calib, "data", None))
    feeds = calibration_feeds(model, model_path=model_path, **kw)
    tensors = pp.calibration_tensors(info)
    with step(f"activation norms ({len(feeds)} samples, {len(tensors)} layer inputs)"):
        return collect_norms(model, tensors, feeds, threads=threads, means=means)


def _lora_config(cfg: PruneConfig, threads: int | None):
    from .lora import LoraConfig

    return LoraConfig(rank=cfg.lora_rank, lr=cfg.lora_lr, window=cfg.lora_window, steps=cfg.recover_steps,
                      minutes=cfg.recover_minutes, threads=threads)


def _lora_prune(model, pp: PrunePass, info, groups, threads, model_path):
    """LoRAPrune: scores and masks from a LoRA fine-tune, then the ONNX surgery on merged weights."""
    from .lora import finetune, group_targets, with_weights

    cfg = pp.config
    targets = group_targets(pp.counts(info, groups))
    with step(f"LoRAPrune fine-tune (rank {cfg.lora_rank}, {_budget(cfg)})"):
        merged, scores, removed, log = finetune(model, _lora_config(cfg, threads), targets, source=cfg.source,
                                                model_path=model_path)
    tuned = with_weights(model, merged)  # same graph: the analysis of the original model holds
    with step(f"pruning {cfg.ratio:.0%} (lorapr, {cfg.budget})"):
        result = pp(tuned, info=info, groups=groups, scores=scores)
    chosen = {g["root"]: g.get("removed_units", []) for g in result.report["groups"]}
    for kind, prefix, _ in targets:
        root = f"{prefix}.{'mlp.gate_proj' if kind == 'mlp' else 'self_attn.q_proj'}.weight.T"
        if sorted(chosen.get(root, [])) != sorted(int(u) for u in removed[(kind, prefix)]):
            raise RuntimeError(f"LoRAPrune: the ONNX pass chose other units of '{root}' than the fine-tune masked")
    result.report["lora"] = log
    return result.model, result.report


def _budget(cfg: PruneConfig) -> str:
    parts = ([f"{cfg.recover_steps} steps"] if cfg.recover_steps else []) + \
        ([f"{cfg.recover_minutes:g} min"] if cfg.recover_minutes else [])
    return " / ".join(parts) or "no budget"


def _recover(model, pp: PrunePass, info, groups, removed: dict, threads, model_path):
    """Recovery: LoRA fine-tune with the chosen units masked, merge, the same plan on merged weights."""
    import re

    from .lora import finetune, with_weights

    cfg = pp.config
    fixed, targets = {}, []
    for root, units in removed.items():
        m = re.match(r"^(model\.layers\.\d+)\.(mlp\.gate_proj|self_attn\.q_proj)\.weight\.T$", root)
        if m:
            kind = "mlp" if m.group(2).startswith("mlp") else "heads"
            fixed[(kind, m.group(1))] = units
            targets.append((kind, m.group(1), len(units)))
    flag = "--recover-steps/--recover-minutes"
    with step(f"LoRA recovery fine-tune (rank {cfg.lora_rank}, {_budget(cfg)})"):
        merged, _, _, log = finetune(model, _lora_config(cfg, threads), targets, fixed=fixed, source=cfg.source,
                                     flag=flag, model_path=model_path)
    tuned = with_weights(model, merged)
    with step(f"pruning {cfg.ratio:.0%} ({cfg.criterion} plan on the fine-tuned weights)"):
        result = pp(tuned, info=info, groups=groups, removed=removed)
    result.report["lora"] = log
    return result.model, result.report


def prune_model(model: onnx.ModelProto, cfg: PruneConfig, calib=None, *, model_path: str = "the model",
                threads: int | None = None, scores: dict | None = None) -> tuple[onnx.ModelProto, dict]:
    """Prune ``model`` (structured, then N:M if ``cfg.nm``); returns (new model, report)."""
    pp = PrunePass(cfg)
    report: dict = {}
    if cfg.ratio > 0:
        with step("dependency analysis"):
            info, groups = pp.analyze(model)
        means: dict = {}
        recover = cfg.recover_steps is not None or cfg.recover_minutes is not None
        classifier = md.get_info(model)["task"] == "image-classification"
        if cfg.criterion == "lorapr" and scores is None:
            model, report = _lora_prune(model, pp, info, groups, threads, model_path)
        elif recover and not classifier:  # choose first (no surgery, weights uncached), fine-tune, then cut
            norms = _norms(model, pp, info, calib, model_path, threads) if cfg.criterion == "activation" else None
            removed = pp.choose(model, info, groups, norms=norms, scores=scores)
            del norms
            info._const_cache.clear()
            model, report = _recover(model, pp, info, groups, removed, threads, model_path)
        else:
            if recover:
                recover_image.check_classifier(model, model_path)
            norms = _norms(model, pp, info, calib, model_path, threads, means) if cfg.criterion == "activation" else None
            with step(f"pruning {cfg.ratio:.0%} ({cfg.criterion}, {cfg.budget})"):
                result = pp(model, info=info, groups=groups, norms=norms, scores=scores, means=means or None)
            if recover:  # an image classifier: the pruned graph trained, distilled from the unpruned one
                result.model, result.report["recovery"] = recover_image.recover_classifier(
                    result.model, model, steps=cfg.recover_steps, minutes=cfg.recover_minutes, init=cfg.recover_init,
                    nm=cfg.nm)
            model, report = result.model, result.report
    elif cfg.nm and (cfg.recover_steps is not None or cfg.recover_minutes is not None):
        # N:M alone on an image classifier: trained into the pattern gradually, then recorded below
        recover_image.check_classifier(model, model_path)
        model, report["recovery"] = recover_image.recover_classifier(
            model, model, steps=cfg.recover_steps, minutes=cfg.recover_minutes, init=cfg.recover_init, nm=cfg.nm)
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
