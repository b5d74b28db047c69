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


def make_plan(model, targets, hessians, sa_cfg, mp: MixedPrecisionConfig, *, src: str = "the model") -> dict:
    if sa_cfg.layer_bits:
        raise UsageError("--bits-budget chooses every layer's bits: drop layer_bits from the recipe (or --bits-budget)")
    widths = sorted(mp.candidates)
    cache = LayerCache(mp.cache)
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
        ids = calibration_windows(model, windows=mp.hawq_probes, window=mp.hawq_window, model_path=src)
        with step(f"mixed precision: HAWQ Hessian traces (<= {mp.hawq_probes} probes x {mp.hawq_window} tokens)"):
            tm = hawq.load_torch_model(source)
            hawq.attach(table, hawq.hessian_traces(tm, table.names(), ids, tol=mp.hawq_tol, max_probes=mp.hawq_probes))
            del tm
        kinds.append("hawq")
    kind = mp.sensitivity
    sens = table.matrix(kind)
    sizes = table.sizes()
    bpw = table.bits_per_weight()
    bpw_of = dict(zip(widths, map(float, bpw)))
    groups = A.groups_by_input([ly.x for ly in table.layers], mp.tie)
    times, time_table = None, None
    latency_budget = None
    if mp.latency_budget_ms is not None:
        from . import latency

        with step("mixed precision: kernel times per layer shape"):
            times, time_table = latency.layer_times([ly.shape for ly in table.layers], widths, sa_cfg.group,
                                                    m=mp.latency_rows, threads=mp.latency_threads, target=mp.target)
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
        plan["latency"] = {"budget_ms": float(mp.latency_budget_ms), "other_ms": float(mp.other_ms),
                           "predicted_ms": res["latency"] + float(mp.other_ms), "per_shape_ms": time_table,
                           "rows": mp.latency_rows, "threads": mp.latency_threads, "target": mp.target}
    # ShiftAddLLM's sort-and-threshold at the same size, scored by the same sensitivity, for reference
    if 2 in widths and 3 in widths and all(ly.shiftaddllm is not None for ly in table.layers):
        scores = np.array([ly.shiftaddllm for ly in table.layers])
        sat = A.threshold_for_budget(scores, sizes, 2, 3, bpw_of, float(mp.bits_budget))
        plan["shiftaddllm_plan"] = {"avg_bits": A.average_bits(sat, sizes, bpw_of),
                                    "objective": float(sum(sens[i, widths.index(int(b))] for i, b in enumerate(sat)))}
    if len(kinds) == 2:
        plan["rank_agreement"] = rank_agreement(table, tuple(kinds))
    log(f"mixed precision: {res['avg_bits']:.3f} bits/weight; widths used "
        f"{ {b: int(np.sum(res['bits'] == b)) for b in widths} }")
    return plan


def to_json(plan: dict) -> dict:
    out = {k: v for k, v in plan.items() if k != "table"}
    out["sensitivity_table"] = plan["table"].to_json()
    return out
