"""The mixed-precision step of ``shiftc compress --bits-budget B`` / ``--size-budget-mb MB``:
sensitivity -> allocation -> plan.

    measure (each layer alone at each candidate width; calib errors, ShiftAddLLM score)
    [hawq: Hutchinson traces through the PyTorch model]
    [latency: kernel time per layer shape and width; fixed cost from compiled uniform plans]
    [size: bytes no width changes (size.fixed_bytes) + exact bytes per layer and width]
    allocate (scipy.optimize.milp) -> {layer: bits}, fed to ShiftAddConfig.layer_bits
    [latency: closed loop — the plan compiled and measured beside the uniform plans; over the
     planned ms: latency model refitted on those measurements, allocate again (--latency-verify)]
    Pareto sweep of the budget; ShiftAddLLM's sort-and-threshold plan at the same size, for reference

The returned dict is JSON-able once :func:`to_json` has turned arrays into lists; the report
(report.py) is drawn from it.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from ...errors import UsageError
from ...progress import log, step
from ..tools import Tools
from . import allocate as A
from .cache import LayerCache
from .config import MixedPrecisionConfig
from .sensitivity import measure, rank_agreement


def _budget_grid(bpw: np.ndarray, budget: float) -> list[float]:
    lo, hi = float(bpw.min()), float(bpw.max())
    grid = list(np.round(np.linspace(lo, hi, 25), 4))
    return sorted(set(grid + [round(float(budget), 4)]))


def _size_accounting(model, targets, sa_cfg, mp: MixedPrecisionConfig, widths: list[int]) -> dict:
    """The fixed bytes of the output (size.fixed_bytes); with a size budget, refused here — before
    the sensitivity step — when even the smallest width does not fit."""
    from .size import fixed_bytes, layer_bytes

    fixed = fixed_bytes(model, targets, sa_cfg)
    if mp.size_budget_mb is not None:
        inits = {t.name: t for t in model.graph.initializer}
        smallest = 0
        for t in targets:
            d = list(inits[t.weight].dims)
            n, k = (d[1], d[0]) if t.transposed else (d[0], d[1])
            smallest += layer_bytes(n, k, min(widths), sa_cfg.group_for(t.name), sa_cfg.scale_mode)
        if fixed["bytes"] + smallest > float(mp.size_budget_mb) * 1e6:
            raise UsageError(f"{mp.budget_flag()}: no per-layer plan fits: {fixed['bytes'] / 1e6:.3f} MB are fixed "
                             f"(embedding table, norms, rope tables, layers left fp32) and the {len(targets)} quantized "
                             f"layers need at least {smallest / 1e6:.3f} MB more at {min(widths)} bits "
                             f"(--mp-candidates); the smallest output is {fixed['bytes'] + smallest:,} bytes")
    return fixed


def make_plan(model, targets, hessians, sa_cfg, mp: MixedPrecisionConfig, *, src: str = "the model",
              tokenizer: str | None = None, tools=None, data=None) -> dict:
    """The per-layer widths under ``mp``'s budget. ``tools`` (shiftc.passes.tools.Tools): compile and
    load, needed by a latency budget (compiled plans are timed). ``data``: the user's calibration
    text (``--calib-data``) for the HAWQ / KL windows."""
    flag = mp.budget_flag().split()[0]
    if sa_cfg.layer_bits:
        raise UsageError(f"{flag} chooses every layer's bits: drop layer_bits from the recipe (or {flag})")
    widths = sorted(mp.candidates)
    if mp.latency_budget_ms is not None:  # fail before the long part
        from .latency import require_kernel

        if sa_cfg.scale_mode == "uniform":
            raise UsageError("--latency-budget-ms times the BCQ LUT kernels (BcqMatMul); with --scale-mode uniform "
                             "plan by size alone (drop --latency-budget-ms)")
        require_kernel(mp.target)
        if mp.other_ms is None:  # the latency model is fitted on compiled plans
            (tools or Tools()).need("compile", "--latency-budget-ms (compiled plans)")
    size = _size_accounting(model, targets, sa_cfg, mp, widths)
    # every layer's result at every width is kept on disk (in a temporary folder, removed when this
    # function returns, if no --mp-cache is given): the output-KL runs and the pass reuse them
    tmp = tempfile.TemporaryDirectory(prefix="shiftc_mp_") if mp.cache is None else None
    cache = LayerCache(mp.cache or tmp.name)
    with step(f"mixed precision: sensitivity of {len(targets)} layers at {widths} bits"):
        table = measure(model, targets, hessians, sa_cfg, widths, cache)
    kinds = ["calib"]
    if mp.sensitivity == "hawq":
        _hawq_sensitivity(table, model, mp, src, tokenizer, data)
        kinds.append("hawq")
    if mp.sensitivity == "kl":
        _kl_sensitivity(table, model, targets, hessians, sa_cfg, mp, widths, cache, src, tokenizer, data)
        kinds.append("kl")
    ctx = _PlanContext(model, targets, hessians, sa_cfg, mp, widths, cache, table, kinds, size, tools)
    verify = mp.latency_budget_ms is not None and mp.latency_verify > 0 and mp.other_ms is None
    lat_dir = tempfile.TemporaryDirectory(prefix="shiftc_latency_") if verify else None
    try:
        calib = _latency_model(ctx, lat_dir.name if lat_dir else None) if mp.latency_budget_ms is not None else {}
        plan = ctx.replan(ctx.fixed)
        if verify:  # the closed loop: compile the plan, measure it beside the calibration plans, plan again if over
            plan = _verify(ctx, plan, calib, lat_dir.name)
    finally:
        if lat_dir:
            lat_dir.cleanup()
    plan["tokenizer"] = tokenizer  # for the report's perplexity (None: the one recorded at export)
    if cache.folder:  # the chosen widths' results, so the pass does not quantize again
        plan["results"] = _results_at(model, targets, hessians, sa_cfg, cache, plan["layer_bits"])
    return plan


def _hawq_sensitivity(table, model, mp, src, tokenizer, data=None) -> None:
    from ...frontend import metadata as md
    from ..calibration import calibration_windows
    from . import hawq

    source = mp.hawq_source or md.get_info(model).get("tokenizer")
    if not source:
        raise UsageError(f"--sensitivity hawq: '{src}' does not record the model it was exported from; "
                         f"give the HF folder or .gguf with hawq_source (recipe) / --hawq-source")
    ids = calibration_windows(model, windows=mp.hawq_probes, window=mp.hawq_window, tokenizer=tokenizer,
                              model_path=src, data=data)
    with step(f"mixed precision: HAWQ Hessian traces (<= {mp.hawq_probes} probes x {mp.hawq_window} tokens)"):
        tm = hawq.load_torch_model(source)
        hawq.attach(table, hawq.hessian_traces(tm, table.names(), ids, tol=mp.hawq_tol, max_probes=mp.hawq_probes))
        del tm


def _kl_sensitivity(table, model, targets, hessians, sa_cfg, mp, widths, cache, src, tokenizer, data=None) -> None:
    from ..calibration import calibration_windows
    from .e2e import kl_cache_keys, output_kl
    from .sensitivity import _weights, quantize_layer

    ids = calibration_windows(model, windows=mp.kl_windows, window=mp.kl_window, tokenizer=tokenizer,
                              model_path=src, data=data)
    weights = _weights(model, targets)
    xs = {t.name: t.x for t in targets}

    def w_hat(name, b):
        h = None if hessians is None else hessians.get(xs[name])
        return quantize_layer(name, weights[name], h, b, sa_cfg, cache).dequantize()

    # output-KL values are cached beside the layer results (keyed by the layer's result key, the
    # windows and the whole model): a second plan costs no forward pass
    kl_keys = kl_cache_keys(model, targets, weights, hessians, sa_cfg, widths, ids) if cache.folder else {}
    stored = cache.get_values("kl")
    done = {}
    for (name, b), k in kl_keys.items():
        if k in stored:
            done.setdefault(name, {})[b] = stored[k]

    def keep(res):
        cache.put_values("kl", {kl_keys[(n, b)]: v for n, d in res.items() for b, v in d.items() if (n, b) in kl_keys})

    with step(f"mixed precision: output KL, each layer alone ({len(ids)} x {ids.shape[1]} tokens)"):
        kl, info = output_kl(model, targets, w_hat, ids, widths, threads=mp.latency_threads, done=done,
                             on_layer=keep if kl_keys else None)
    for ly in table.layers:
        ly.kl = dict(kl[ly.name])
    table.info["kl"] = info


@dataclass
class _PlanContext:
    """What planning under a latency budget carries from step to step."""

    model: object
    targets: list
    hessians: object
    sa_cfg: object
    mp: MixedPrecisionConfig
    widths: list
    cache: LayerCache
    table: object
    kinds: list
    size: dict | None
    tools: object
    times: object = None
    time_table: object = None
    fixed: dict | None = None

    def results(self, layer_bits: dict) -> dict:
        return _results_at(self.model, self.targets, self.hessians, self.sa_cfg, self.cache, layer_bits)

    def replan(self, fixed) -> dict:
        return plan_from_table(self.table, self.mp, self.kinds, times=self.times, time_table=self.time_table,
                               fixed=fixed, size=self.size)


def _latency_model(ctx: _PlanContext, keep: str | None) -> dict:
    """Kernel times per layer shape, and (unless ``other_ms`` is given) the fixed cost and kernel
    scale from the compiled uniform smallest/largest plans. Returns those plans {name: (library,
    Σ kernel ms)} for the closed loop (libraries kept in ``keep``)."""
    from . import latency

    mp, widths = ctx.mp, ctx.widths
    with step("mixed precision: kernel times per layer shape"):
        ctx.times, ctx.time_table = latency.layer_times([ly.shape for ly in ctx.table.layers], widths,
                                                        ctx.sa_cfg.group, m=mp.latency_rows,
                                                        threads=mp.latency_threads, target=mp.target)
    if mp.other_ms is not None:
        return {}
    plans = {f"uniform-{widths[j]}": (ctx.results({t.name: widths[j] for t in ctx.targets}),
                                      float(ctx.times[:, j].sum()))
             for j in sorted({0, len(widths) - 1})}
    with step(f"mixed precision: latency model from the compiled {' and '.join(plans)} plans"):
        fixed = latency.measure_fixed_cost(ctx.model, plans, ctx.sa_cfg, ctx.tools, threads=mp.latency_threads,
                                           rounds=mp.latency_measure_rounds, keep=keep)
    libs = fixed.pop("libs", {})
    log("mixed precision: decode " + ", ".join(f"{k} {v:.2f} ms/token (kernels alone {fixed['kernel_ms'][k]:.2f})"
                                                for k, v in fixed["measured_ms"].items())
        + f": fixed cost {fixed['other_ms']:.2f} ms, kernel scale {fixed['scale']:.2f}")
    ctx.fixed = fixed
    return {n: (libs.get(n), k) for n, (_, k) in plans.items()}


def _verify(ctx: _PlanContext, plan: dict, calib: dict, folder: str) -> dict:
    """The closed loop (latency.close_loop): the plan compiled and timed beside the calibration plans."""
    from dataclasses import replace

    from . import latency

    mp, table = ctx.mp, ctx.table
    col = {b: j for j, b in enumerate(ctx.widths)}
    count = itertools.count(1)

    def build(layer_bits):
        so = os.path.join(folder, f"plan-{next(count)}.so")
        avg = A.average_bits(np.array(list(layer_bits.values())), table.sizes(),
                             A.bpw_by_width(table.bits, table.layer_bits_per_weight()))
        with step(f"mixed precision: compiling the plan ({avg:.3f} bits/weight) to measure it"):
            return latency.compile_plan(ctx.model, ctx.results(layer_bits), replace(ctx.sa_cfg, layer_bits=dict(layer_bits)),
                                        so, ctx.tools.compile)

    def time_libs(libs):
        ms = latency.decode_ms(libs, load=ctx.tools.load, threads=mp.latency_threads, rounds=mp.latency_verify_rounds)
        out = {k: float(np.median(v)) for k, v in ms.items()}
        log("mixed precision: decode " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()) + " ms/token")
        return out

    plan = latency.close_loop(plan, ctx.replan, build, time_libs,
                              lambda lb: sum(ctx.times[i, col[b]] for i, b in enumerate(lb.values())), calib,
                              iterations=mp.latency_verify)
    v = plan["latency"]["verify"]
    last = v["iterations"][-1]
    if v["accepted"]:
        log(f"mixed precision: the compiled plan measures {last['measured_ms']:.2f} ms/token, within the planned "
            f"{last['planned_ms']:.2f} (budget {mp.latency_budget_ms:g})")
    else:
        log(f"mixed precision: WARNING the compiled plan measures {last['measured_ms']:.2f} ms/token, over the "
            f"planned {last['planned_ms']:.2f} (budget {mp.latency_budget_ms:g}) after {len(v['iterations'])} "
            f"measured plan(s) (--latency-verify)")
    return plan


def _results_at(model, targets, hessians, sa_cfg, cache, layer_bits: dict) -> dict:
    """{layer: BcqResult | UniformResult} at the given widths, from the per-layer cache (quantized on a miss)."""
    from .sensitivity import _weights, quantize_layer

    weights = _weights(model, targets)
    return {t.name: quantize_layer(t.name, weights[t.name], None if hessians is None else hessians.get(t.x),
                                   int(layer_bits[t.name]), sa_cfg, cache) for t in targets}


def plan_from_table(table, mp: MixedPrecisionConfig, kinds=("calib",), *, times=None, time_table=None,
                    fixed: dict | None = None, size: dict | None = None) -> dict:
    """Allocation, Pareto sweep, ShiftAddLLM reference plan and rank agreement from a measured table.

    ``size``: the output's fixed bytes (size.fixed_bytes), needed by a size budget; with it the plan
    records its bytes in ``plan["size"]`` (planned total = fixed + the layers at their widths).

    Latency model (with ``times`` and a latency budget): decode ms = other + s·Σ_i times[i, b_i], with
    other = ``mp.other_ms`` and s = 1, else other and s from ``fixed`` (latency.measure_fixed_cost),
    else 0 and 1. The plan's predicted ms is held to ``latency_budget_ms · (1 − latency_margin)``."""
    widths = list(table.bits)
    kind = mp.sensitivity
    sens = table.matrix(kind)
    sizes = table.sizes()
    bpw = table.layer_bits_per_weight()  # [L, W]: each layer at its own group
    bpw_of = A.bpw_by_width(widths, bpw)
    if mp.size_budget_mb is not None and size is None:
        raise ValueError("plan_from_table: a size budget needs the output's fixed bytes (size=size.fixed_bytes(...))")
    layer_bytes = table.layer_bytes() if size is not None else None
    budget_bytes = None if mp.size_budget_mb is None else int(np.floor(float(mp.size_budget_mb) * 1e6))
    groups = A.groups_by_input([ly.x for ly in table.layers], mp.tie)
    other = float(mp.other_ms) if mp.other_ms is not None else float(fixed["other_ms"]) if fixed else 0.0
    scale = 1.0 if mp.other_ms is not None or not fixed else float(fixed.get("scale", 1.0))
    if times is not None:
        times = scale * np.asarray(times, np.float64)
    margin = float(mp.latency_margin)
    planned_ms = latency_budget = None
    if times is not None and mp.latency_budget_ms is not None:
        planned_ms, latency_budget = _latency_budget(mp, times, other)
    res = A.allocate(sens, sizes, widths, bpw, None if mp.bits_budget is None else float(mp.bits_budget),
                     groups=groups, times=times, latency_budget=latency_budget, layer_bytes=layer_bytes,
                     bytes_budget=budget_bytes, fixed_bytes=0 if size is None else size["bytes"],
                     budget_flag=mp.budget_flag())
    layer_bits = {ly.name: int(b) for ly, b in zip(table.layers, res["bits"])}
    # the budget as average bits per weight: given, or what the size budget allowed
    bits_equiv = float(mp.bits_budget) if mp.bits_budget is not None else res["avg_bits"]
    front = A.pareto(sens, sizes, widths, bpw, _budget_grid(table.bits_per_weight(), bits_equiv), groups=groups)
    plan = {"kind": kind, "candidates": widths,
            "bits_budget": None if mp.bits_budget is None else float(mp.bits_budget),
            "size_budget_mb": None if mp.size_budget_mb is None else float(mp.size_budget_mb),
            "scale_mode": table.scale_mode, "tie": mp.tie,
            "layer_bits": layer_bits, "avg_bits": res["avg_bits"], "objective": res["objective"],
            "pareto": front, "table": table, "latency": None, "size": None}
    if size is not None:
        plan["size"] = _size_record(table, widths, layer_bits, layer_bytes, budget_bytes, size, plan["size_budget_mb"])
    if times is not None:
        plan["latency"] = {"budget_ms": mp.latency_budget_ms, "margin": margin, "planned_ms": planned_ms,
                           "other_ms": other,
                           "other_from": "given" if mp.other_ms is not None else "measured" if fixed else "none",
                           "fixed_cost": fixed, "kernel_scale": scale, "kernel_ms": res["latency"],
                           "predicted_ms": res["latency"] + other, "measured_ms": None, "per_shape_ms": time_table,
                           "rows": mp.latency_rows, "threads": mp.latency_threads, "target": mp.target}
    # ShiftAddLLM's sort-and-threshold at the same size, scored by the same sensitivity, for reference
    if 2 in widths and 3 in widths and all(ly.shiftaddllm is not None for ly in table.layers):
        scores = np.array([ly.shiftaddllm for ly in table.layers])
        sat = A.threshold_for_budget(scores, sizes, 2, 3, bpw_of, bits_equiv)
        plan["shiftaddllm_plan"] = {"avg_bits": A.average_bits(sat, sizes, bpw_of),
                                    "objective": float(sum(sens[i, widths.index(int(b))] for i, b in enumerate(sat)))}
    pairs = [(x, y) for i, x in enumerate(kinds) for y in kinds[i + 1:]]
    if pairs:
        plan["rank_agreement"] = {f"{x} vs {y}": rank_agreement(table, (x, y)) for x, y in pairs}
    log(f"mixed precision: {res['avg_bits']:.3f} bits/weight"
        + (f", {plan['size']['planned_bytes'] / 1e6:.3f} MB in all" if plan["size"] else "")
        + f"; widths used { {b: int(np.sum(res['bits'] == b)) for b in widths} }")
    return plan


def _latency_budget(mp: MixedPrecisionConfig, times, other: float) -> tuple[float, float]:
    """(planned decode ms: the budget less the margin, the kernels' share of it); refused when no
    plan can meet it."""
    margin = float(mp.latency_margin)
    # the MILP plans against the budget less the margin (room for the latency model's error)
    planned_ms = float(mp.latency_budget_ms) * (1.0 - margin)
    with_margin = f" less the {100 * margin:g}% --latency-margin ({planned_ms:.2f} ms)" if margin else ""
    latency_budget = planned_ms - other
    if latency_budget <= 0:
        raise UsageError(f"--latency-budget-ms {mp.latency_budget_ms:g}{with_margin}: not more than the "
                         f"{other:.2f} ms decode time outside the quantized layers")
    floor = other + float(np.asarray(times).min(1).sum())
    if floor > planned_ms:
        raise UsageError(f"--latency-budget-ms {mp.latency_budget_ms:g}{with_margin}: the fastest plan (every "
                         f"layer at the smallest width) is predicted at {floor:.2f} ms/token ({other:.2f} ms "
                         f"outside the quantized layers)")
    return planned_ms, latency_budget


def _size_record(table, widths, layer_bits: dict, layer_bytes, budget_bytes, size: dict, budget_mb) -> dict:
    """plan["size"]: the fixed bytes, each layer's bytes at its width, the planned total."""
    col = {b: j for j, b in enumerate(widths)}
    per_layer = {ly.name: int(layer_bytes[i, col[layer_bits[ly.name]]]) for i, ly in enumerate(table.layers)}
    return {"budget_mb": budget_mb, "budget_bytes": budget_bytes,
            "fixed_bytes": int(size["bytes"]), "embedding_bytes": dict(size["embedding"]),
            "tied_tables": list(size["tied"]), "kept_initializers": len(size["kept"]),
            "quantized_bytes": int(sum(per_layer.values())),
            "planned_bytes": int(size["bytes"]) + int(sum(per_layer.values())),
            "layer_bytes": per_layer, "realised_bytes": None}


def to_json(plan: dict) -> dict:
    out = {k: v for k, v in plan.items() if k not in ("table", "results", "tokenizer")}
    out["sensitivity_table"] = plan["table"].to_json()
    return out


def measure_perplexity(source: str, output: str, tokens: int, window: int, threads: int | None = None,
                       tokenizer: str | None = None, *, evaluate) -> dict:
    """Perplexity of the source and of the compressed model on the held-out split (ONNX Runtime).

    api.evaluate scores the compressed model through its de-quantized copy (Ŵ written back as fp32
    MatMul weights: the same numbers as its BcqMatMul function bodies); ``evaluate`` is shiftc.evaluate."""
    before = evaluate(source, tokens=tokens, window=window, threads=threads, tokenizer=tokenizer)
    after = evaluate(output, tokens=tokens, window=window, threads=threads, tokenizer=tokenizer)
    return {"before": before["perplexity"], "after": after["perplexity"], "tokens": before["tokens_scored"],
            "window": window, "corpus": f"{before['corpus']}/{before['split']}"}


def finish(result: dict, plan: dict, mp: MixedPrecisionConfig, *, threads: int | None = None, tools=None) -> dict:
    """After the pass: perplexity before/after (``eval_tokens`` > 0), the report files, a summary.
    ``tools`` (Tools): compile and load for ``measure_latency``, evaluate for ``eval_tokens``."""
    from . import report

    if mp.measure_latency and plan.get("latency") is None:  # size-only plan: its decode time alone
        plan["latency"] = {"budget_ms": None, "predicted_ms": None, "threads": mp.latency_threads, "target": mp.target}
    lt = plan.get("latency")
    tools = tools or Tools()
    if mp.measure_latency:  # the compiled output's decode time (against the budget, when there is one)
        from .latency import decode_ms

        compile_model, load = tools.need("compile", "measure_latency"), tools.need("load", "measure_latency")
        with tempfile.TemporaryDirectory(prefix="shiftc_latency_") as d:
            so = os.path.join(d, "out.so")
            with step("mixed precision: compiling the output to measure its decode time"):
                compile_model(result["path"], so)
                ms = decode_ms({"out": so}, load=load, threads=mp.latency_threads,
                               rounds=mp.latency_measure_rounds)["out"]
        lt["measured_ms"] = float(np.median(ms))
        lt["measured_rounds"] = mp.latency_measure_rounds
        if lt["budget_ms"] is not None:
            lt["meets_budget"] = bool(lt["measured_ms"] <= float(lt["budget_ms"]))
            log(f"mixed precision: decode {lt['measured_ms']:.2f} ms/token measured, {lt['predicted_ms']:.2f} "
                f"predicted, budget {lt['budget_ms']:g}")
        else:
            log(f"mixed precision: decode {lt['measured_ms']:.2f} ms/token measured")
    if plan.get("size") is not None and "weights" in result:  # bytes of every initializer actually written
        sz = plan["size"]
        sz["realised_bytes"] = int(result["weights"]["total"])
        if sz["budget_bytes"] is not None:
            sz["meets_budget"] = bool(sz["realised_bytes"] <= sz["budget_bytes"])
            log(f"mixed precision: output weights {sz['realised_bytes'] / 1e6:.3f} MB (planned "
                f"{sz['planned_bytes'] / 1e6:.3f}), budget {sz['budget_mb']:g} MB")
    ppl = measure_perplexity(result["source"], result["path"], mp.eval_tokens, mp.eval_window, threads,
                             plan.get("tokenizer"), evaluate=tools.need("evaluate", "--report-eval-tokens")) \
        if mp.eval_tokens else None
    files = report.write(result["path"], result, plan, ppl) if mp.report else None
    keep = ("kind", "candidates", "bits_budget", "size_budget_mb", "scale_mode", "tie", "avg_bits", "objective",
            "size", "latency", "shiftaddllm_plan", "rank_agreement", "pareto")
    return {**{k: plan[k] for k in keep if k in plan}, "perplexity": ppl, "report": files}
