"""The mixed-precision step of ``shiftc compress --bits-budget B``: sensitivity -> allocation -> plan.

    measure (each layer alone at each candidate width; calib errors, ShiftAddLLM score)
    [hawq: Hutchinson traces through the PyTorch model]
    [latency: kernel time per layer shape and width]
    allocate (scipy.optimize.milp) -> {layer: bits}, fed to ShiftAddConfig.layer_bits
    Pareto sweep of the budget; ShiftAddLLM's sort-and-threshold plan at the same size, for reference

The returned dict is JSON-able once :func:`to_json` has turned arrays into lists; the report
(report.py) is drawn from it.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from ...errors import UsageError
from ...progress import log, step
from . import allocate as A
from .cache import LayerCache
from .config import MixedPrecisionConfig
from .sensitivity import measure, rank_agreement


def _budget_grid(bpw: np.ndarray, budget: float) -> list[float]:
    lo, hi = float(bpw.min()), float(bpw.max())
    grid = list(np.round(np.linspace(lo, hi, 25), 4))
    return sorted(set(grid + [round(float(budget), 4)]))


def make_plan(model, targets, hessians, sa_cfg, mp: MixedPrecisionConfig, *, src: str = "the model",
              tokenizer: str | None = None) -> dict:
    if sa_cfg.layer_bits:
        raise UsageError("--bits-budget chooses every layer's bits: drop layer_bits from the recipe (or --bits-budget)")
    widths = sorted(mp.candidates)
    if mp.latency_budget_ms is not None:  # fail before the long part
        from .latency import require_kernel

        require_kernel(mp.target)
    # every layer's result at every width is kept on disk (in a temporary folder, removed when this
    # function returns, if no --mp-cache is given): the output-KL runs and the pass reuse them
    tmp = tempfile.TemporaryDirectory(prefix="shiftc_mp_") if mp.cache is None else None
    cache = LayerCache(mp.cache or tmp.name)
    with step(f"mixed precision: sensitivity of {len(targets)} layers at {widths} bits"):
        table = measure(model, targets, hessians, sa_cfg, widths, cache)
    kinds = ["calib"]
    if mp.sensitivity == "hawq":
        from ...frontend import metadata as md
        from ..calibration import calibration_windows
        from . import hawq

        source = mp.hawq_source or md.get_info(model).get("tokenizer")
        if not source:
            raise UsageError(f"--sensitivity hawq: '{src}' does not record the model it was exported from; "
                             f"give the HF folder or .gguf with hawq_source (recipe) / --hawq-source")
        ids = calibration_windows(model, windows=mp.hawq_probes, window=mp.hawq_window, tokenizer=tokenizer,
                                  model_path=src)
        with step(f"mixed precision: HAWQ Hessian traces (<= {mp.hawq_probes} probes x {mp.hawq_window} tokens)"):
            tm = hawq.load_torch_model(source)
            hawq.attach(table, hawq.hessian_traces(tm, table.names(), ids, tol=mp.hawq_tol, max_probes=mp.hawq_probes))
            del tm
        kinds.append("hawq")
    if mp.sensitivity == "kl":
        from ..calibration import calibration_windows
        from .e2e import output_kl
        from .sensitivity import _weights, quantize_layer

        ids = calibration_windows(model, windows=mp.kl_windows, window=mp.kl_window, tokenizer=tokenizer,
                                  model_path=src)
        weights = _weights(model, targets)
        xs = {t.name: t.x for t in targets}

        def w_hat(name, b):
            h = None if hessians is None else hessians.get(xs[name])
            return quantize_layer(name, weights[name], h, b, sa_cfg, cache).dequantize()

        with step(f"mixed precision: output KL, each layer alone ({len(ids)} x {ids.shape[1]} tokens)"):
            kl, info = output_kl(model, targets, w_hat, ids, widths, threads=mp.latency_threads)
        for ly in table.layers:
            ly.kl = dict(kl[ly.name])
        table.info["kl"] = info
        kinds.append("kl")
    times, time_table = None, None
    if mp.latency_budget_ms is not None:
        from . import latency

        with step("mixed precision: kernel times per layer shape"):
            times, time_table = latency.layer_times([ly.shape for ly in table.layers], widths, sa_cfg.group,
                                                    m=mp.latency_rows, threads=mp.latency_threads, target=mp.target)
    plan = plan_from_table(table, mp, kinds, times=times, time_table=time_table)
    plan["tokenizer"] = tokenizer  # for the report's perplexity (None: the one recorded at export)
    if cache.folder:  # the chosen widths' results, so the pass does not quantize again
        from .sensitivity import _weights, quantize_layer

        weights = _weights(model, targets)
        plan["results"] = {t.name: quantize_layer(t.name, weights[t.name], None if hessians is None else hessians.get(t.x),
                                                  plan["layer_bits"][t.name], sa_cfg, cache) for t in targets}
    return plan


def plan_from_table(table, mp: MixedPrecisionConfig, kinds=("calib",), *, times=None, time_table=None) -> dict:
    """Allocation, Pareto sweep, ShiftAddLLM reference plan and rank agreement from a measured table."""
    widths = list(table.bits)
    kind = mp.sensitivity
    sens = table.matrix(kind)
    sizes = table.sizes()
    bpw = table.bits_per_weight()
    bpw_of = dict(zip(widths, map(float, bpw)))
    groups = A.groups_by_input([ly.x for ly in table.layers], mp.tie)
    latency_budget = None
    if times is not None and mp.latency_budget_ms is not None:
        latency_budget = float(mp.latency_budget_ms) - float(mp.other_ms)
        if latency_budget <= 0:
            raise UsageError(f"--latency-budget-ms {mp.latency_budget_ms}: not more than the {mp.other_ms} ms "
                             f"outside the quantized layers")
    res = A.allocate(sens, sizes, widths, bpw, float(mp.bits_budget), groups=groups, times=times,
                     latency_budget=latency_budget)
    layer_bits = {ly.name: int(b) for ly, b in zip(table.layers, res["bits"])}
    front = A.pareto(sens, sizes, widths, bpw, _budget_grid(bpw, mp.bits_budget), groups=groups)
    plan = {"kind": kind, "candidates": widths, "bits_budget": float(mp.bits_budget), "tie": mp.tie,
            "layer_bits": layer_bits, "avg_bits": res["avg_bits"], "objective": res["objective"],
            "pareto": front, "table": table, "latency": None}
    if times is not None:
        plan["latency"] = {"budget_ms": mp.latency_budget_ms, "other_ms": float(mp.other_ms),
                           "predicted_ms": res["latency"] + float(mp.other_ms), "per_shape_ms": time_table,
                           "rows": mp.latency_rows, "threads": mp.latency_threads, "target": mp.target}
    # ShiftAddLLM's sort-and-threshold at the same size, scored by the same sensitivity, for reference
    if 2 in widths and 3 in widths and all(ly.shiftaddllm is not None for ly in table.layers):
        scores = np.array([ly.shiftaddllm for ly in table.layers])
        sat = A.threshold_for_budget(scores, sizes, 2, 3, bpw_of, float(mp.bits_budget))
        plan["shiftaddllm_plan"] = {"avg_bits": A.average_bits(sat, sizes, bpw_of),
                                    "objective": float(sum(sens[i, widths.index(int(b))] for i, b in enumerate(sat)))}
    pairs = [(x, y) for i, x in enumerate(kinds) for y in kinds[i + 1:]]
    if pairs:
        plan["rank_agreement"] = {f"{x} vs {y}": rank_agreement(table, (x, y)) for x, y in pairs}
    log(f"mixed precision: {res['avg_bits']:.3f} bits/weight; widths used "
        f"{ {b: int(np.sum(res['bits'] == b)) for b in widths} }")
    return plan


def to_json(plan: dict) -> dict:
    out = {k: v for k, v in plan.items() if k not in ("table", "results", "tokenizer")}
    out["sensitivity_table"] = plan["table"].to_json()
    return out


def measure_perplexity(source: str, output: str, tokens: int, window: int, threads: int | None = None,
                       tokenizer: str | None = None) -> dict:
    """Perplexity of the source and of the compressed model on the held-out split (ONNX Runtime).

    The compressed model is evaluated through a copy with Ŵ written back as fp32 MatMul weights
    (assemble.dequantized_copy: the same numbers as its BcqMatMul function bodies)."""
    from ... import api
    from ...frontend.onnx_io import load_model, save_model
    from .assemble import dequantized_copy

    before = api.evaluate(source, tokens=tokens, window=window, threads=threads, tokenizer=tokenizer)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(output))) as d:
        deq = os.path.join(d, "dequantized.onnx")
        save_model(dequantized_copy(load_model(output)), deq)
        after = api.evaluate(deq, tokens=tokens, window=window, threads=threads, tokenizer=tokenizer)
    return {"before": before["perplexity"], "after": after["perplexity"], "tokens": before["tokens_scored"],
            "window": window, "corpus": f"{before['corpus']}/{before['split']}"}


def finish(result: dict, plan: dict, mp: MixedPrecisionConfig, *, threads: int | None = None) -> dict:
    """After the pass: perplexity before/after (``eval_tokens`` > 0), the report files, a summary."""
    from . import report

    ppl = measure_perplexity(result["source"], result["path"], mp.eval_tokens, mp.eval_window, threads,
                             plan.get("tokenizer")) if mp.eval_tokens else None
    files = report.write(result["path"], result, plan, ppl) if mp.report else None
    keep = ("kind", "candidates", "bits_budget", "tie", "avg_bits", "objective", "latency", "shiftaddllm_plan",
            "rank_agreement", "pareto")
    return {**{k: plan[k] for k in keep if k in plan}, "perplexity": ppl, "report": files}
