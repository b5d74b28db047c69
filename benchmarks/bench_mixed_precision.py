"""Mixed-precision allocation on SmolLM2-135M at an average of 2.5 bits per weight, side by side.

Plans compared at the same size (average stored bits per weight over all 211 quantized weights,
scales included, bcq.bits_per_weight; group 128, power-of-two scales, GPTQ with the calibration H):

  mp-calib        shiftc's integer program on the calibration-only sensitivity tr(ΔW H ΔWᵀ)
  mp-hawq         the same program on HAWQ-V2 sensitivity (Hutchinson Hessian traces, PyTorch)
  mp-kl           the same program on the output KL with each layer alone quantized (ONNX Runtime)
  shiftaddllm     ShiftAddLLM's sort-and-threshold: layers sorted by its Cholesky-based score, the
                  top ones 3-bit and the rest 2-bit, the threshold set by the same size budget
  random-{0,1,2}  random widths from the same candidates, average within 0.02 below the budget

Each layer is quantized once per candidate width (cached under --cache, default out/bench/mp/cache)
and every plan is assembled from the cache (Ŵ written back as fp32 weights: the same numbers the
BcqMatMul function bodies compute), so a plan costs one perplexity evaluation, not one
quantization. Perplexity: shiftc.evaluate (ONNX Runtime, non-overlapping windows of the held-out
Wikipedia split, each from an empty cache), one thread.

    .venv/bin/python benchmarks/bench_mixed_precision.py --tokens 8192 \
        --out benchmarks/results/mixed_precision.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from common import work_dir, write_results


class LazyH(dict):
    """{input tensor: H} read from the .npz on first use; digests computed once."""

    def __init__(self, z):
        super().__init__()
        self.z = z
        self.keys_ = {k.replace("|", "/"): k for k in z.files}

    def __getitem__(self, k):
        return self.z[self.keys_[k]]

    def get(self, k, default=None):
        return self[k] if k in self.keys_ else default

    def __contains__(self, k):
        return k in self.keys_


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(work_dir("sa"), "smol.onnx"), help="exported SmolLM2 .onnx (exported there if missing)")
    p.add_argument("--work", default=work_dir("mp"), help="folder for H, tables, traces and the evaluated models")
    p.add_argument("--cache", default=None, help="per-layer result cache (default WORK/cache)")
    p.add_argument("--budget", type=float, default=2.5)
    p.add_argument("--candidates", default="2,3", help="widths the plans choose from")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--calib-window", type=int, default=256)
    p.add_argument("--hawq-probes", type=int, default=32)
    p.add_argument("--hawq-window", type=int, default=128)
    p.add_argument("--hawq-tol", type=float, default=0.01)
    p.add_argument("--random", type=int, default=3, help="number of random plans")
    p.add_argument("--kl-windows", type=int, default=2, help="calibration windows for the output-KL sensitivity")
    p.add_argument("--kl-window", type=int, default=128)
    p.add_argument("--plans", default="mp-calib,mp-hawq,shiftaddllm,random",
                   help="which plans to evaluate (also: fp32, uniform-2, uniform-3, shiftaddllm-80-20, mp-calib-80-20)")
    p.add_argument("--latency-fraction", type=float, default=0.9,
                   help="plans '<kind>-lat': kernel-time budget as this fraction of the size-only plan's modelled time")
    p.add_argument("--seed-from", default="", help="compressed models whose layers seed the cache: BITS=PATH,...")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/mixed_precision.json")
    a = p.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    import shiftc.api
    from onnx import numpy_helper

    from shiftc.frontend.data import smollm2_gguf
    from shiftc.frontend.onnx_io import load_model, save_model
    from shiftc.passes.calibration import calibration_windows, collect_hessians
    from shiftc.passes.mixed_precision import allocate as A
    from shiftc.passes.mixed_precision import hawq
    from shiftc.passes.mixed_precision.assemble import with_weights
    from shiftc.passes.mixed_precision.cache import LayerCache, digest, result_key
    from shiftc.passes.mixed_precision.sensitivity import SensitivityTable, measure, quantize_layer, rank_agreement
    from shiftc.passes.shiftadd import ShiftAddConfig, ShiftAddPass

    os.makedirs(a.work, exist_ok=True)
    cache = LayerCache(a.cache or os.path.join(a.work, "cache"))
    widths = [int(b) for b in a.candidates.split(",")]
    timings = {}
    if not os.path.exists(a.model):
        shiftc.export(str(smollm2_gguf()), a.model, max_positions=1024)
    model = load_model(a.model)
    # the quantizer settings are pinned (not ShiftAddConfig's defaults, which may change): they are part
    # of the cache keys, and the comparison must use one quantizer throughout
    cfg = ShiftAddConfig(group=a.group, scale_mode="pow2", act_order=False, damp=0.01, iters=6)
    targets, _ = ShiftAddPass(cfg).match(model)

    # calibration H (saved: the cache keys depend on it)
    hpath = os.path.join(a.work, "hessians.npz")
    if os.path.exists(hpath):  # loaded on demand (807 MB as float64 for SmolLM2): only cache misses need H
        z = np.load(hpath)
        hs = LazyH(z)
    else:
        t0 = time.perf_counter()
        ids = calibration_windows(model, windows=a.calib_windows, window=a.calib_window, model_path=a.model)
        hs = collect_hessians(model, [t.x for t in targets], ids, threads=a.threads)
        np.savez(hpath, **{k.replace("/", "|"): v for k, v in hs.items()})
        timings["calibration"] = round(time.perf_counter() - t0, 1)
    inits = {t.name: t for t in model.graph.initializer}
    by_name = {t.name: t for t in targets}
    k_of = {t.name: int(inits[t.weight].dims[0 if t.transposed else 1]) for t in targets}  # K of W [N, K]

    def weight(name):  # W [N, K] on demand (a dict of all of them would double the model's memory)
        t = by_name[name]
        w = numpy_helper.to_array(inits[t.weight]).astype(np.float32)
        return w.T if t.transposed else w

    w_digest = {}

    def wd(name):
        if name not in w_digest:
            w_digest[name] = digest(weight(name))
        return w_digest[name]

    h_digest = {}

    def hd(x):
        if x not in h_digest:
            h_digest[x] = digest(hs[x])
        return h_digest[x]

    def result(name, b):  # from the cache (without touching the graph), else quantized now
        t = by_name[name]
        r = cache.get(name, int(b), result_key(name, wd(name), hd(t.x), int(b), cfg), k_of[name], cfg.group,
                      cfg.scale_mode)
        return r if r is not None else quantize_layer(name, weight(name), hs[t.x], int(b), cfg, cache, wd(name), hd(t.x))

    # optional: seed the cache from compressed models made with the same settings
    for item in filter(None, a.seed_from.split(",")):
        b, path = item.split("=", 1)
        b = int(b)
        inits = {t.name: t for t in load_model(path).graph.initializer}
        for t in targets:
            prefix = t.name[: -len(".weight.T")] if t.name.endswith(".weight.T") else t.name
            key = result_key(t.name, wd(t.name), hd(t.x), b, cfg)
            if not os.path.exists(cache.path(t.name, b, key)):
                cache.put(t.name, b, key, numpy_helper.to_array(inits[prefix + ".bcq_planes"]),
                          numpy_helper.to_array(inits[prefix + ".bcq_exps"]))

    # sensitivity tables, one per width (so a new width only adds its own pass)
    tables = []
    for b in widths:
        tp = os.path.join(a.work, f"table_b{b}.json")
        if os.path.exists(tp):
            tb = SensitivityTable.load(tp)
        else:
            t0 = time.perf_counter()
            tb = measure(model, targets, hs, cfg, [b], cache)
            tb.save(tp)
            timings[f"sensitivity {b}-bit"] = round(time.perf_counter() - t0, 1)
        tables.append(tb)
    table = SensitivityTable.merged(tables, widths)
    kinds = ["calib"]
    plans_wanted = a.plans.split(",")

    # HAWQ traces
    hq = os.path.join(a.work, "hawq.json")
    if any(pl.startswith("mp-hawq") for pl in plans_wanted):
        if os.path.exists(hq):
            tr = json.load(open(hq))
        else:
            t0 = time.perf_counter()
            ids = calibration_windows(model, windows=a.hawq_probes, window=a.hawq_window, model_path=a.model)
            tr = hawq.hessian_traces(hawq.load_torch_model(str(smollm2_gguf())), table.names(), ids,
                                     tol=a.hawq_tol, min_probes=8, max_probes=a.hawq_probes)
            json.dump(tr, open(hq, "w"))
            timings["hawq traces"] = round(time.perf_counter() - t0, 1)
        hawq.attach(table, tr)
        kinds.append("hawq")

    # output-KL sensitivity through ONNX Runtime (each layer alone quantized)
    klp = os.path.join(a.work, "kl.json")
    if any(pl.startswith("mp-kl") for pl in plans_wanted):
        from shiftc.passes.mixed_precision.e2e import output_kl

        if os.path.exists(klp):
            kl = {k: {int(b): v for b, v in d.items()} for k, d in json.load(open(klp))["kl"].items()}
        else:
            t0 = time.perf_counter()
            ids = calibration_windows(model, windows=a.kl_windows, window=a.kl_window, model_path=a.model)

            def w_hat(name, b):
                return result(name, b).dequantize()

            part = klp + ".partial"
            done = {k: {int(b): v for b, v in d.items()} for k, d in json.load(open(part)).items()} \
                if os.path.exists(part) else None

            def save_part(res):
                with open(part + ".tmp", "w") as f:
                    json.dump(res, f)
                os.replace(part + ".tmp", part)

            for t in targets:  # digests and weights read before the graph is rewritten in place
                wd(t.name)
            kl, info = output_kl(model, targets, w_hat, ids, widths, threads=a.threads, done=done, on_layer=save_part,
                                 in_place=True)
            model = load_model(a.model)  # the rewritten graph is no longer the source model
            inits = {t.name: t for t in model.graph.initializer}
            json.dump({"kl": kl, "info": info}, open(klp, "w"))
            timings["output KL"] = round(time.perf_counter() - t0, 1)
        for ly in table.layers:
            ly.kl = dict(kl[ly.name])
        kinds.append("kl")

    sizes = table.sizes()
    bpw = table.bits_per_weight()
    bpw_of = dict(zip(widths, map(float, bpw)))
    scores = np.array([ly.shiftaddllm for ly in table.layers])
    plans: dict[str, np.ndarray] = {}
    latency_info = None
    if any(pl.endswith("-lat") for pl in plans_wanted):  # latency model from the LUT kernels (decode, 1 row)
        from shiftc.passes.mixed_precision.latency import layer_times

        times, per_shape = layer_times([ly.shape for ly in table.layers], widths, a.group, threads=a.threads)
        latency_info = {"per_shape_ms": per_shape, "fraction": a.latency_fraction, "plans": {}}
    for pl in plans_wanted:
        if pl.endswith("-lat"):
            kind = pl[3:-4]
            free = A.allocate(table.matrix(kind), sizes, widths, bpw, a.budget, times=times)
            budget_ms = a.latency_fraction * free["latency"]
            r = A.allocate(table.matrix(kind), sizes, widths, bpw, a.budget, times=times, latency_budget=budget_ms)
            plans[pl] = r["bits"]
            latency_info["plans"][pl] = {"size_only_ms": free["latency"], "budget_ms": budget_ms,
                                         "predicted_ms": r["latency"], "avg_bits": r["avg_bits"],
                                         "objective": r["objective"], "size_only_objective": free["objective"]}
            continue
        if pl in ("mp-calib", "mp-hawq", "mp-kl"):
            plans[pl] = A.allocate(table.matrix(pl[3:]), sizes, widths, bpw, a.budget)["bits"]
        elif pl == "shiftaddllm":
            plans[pl] = A.threshold_for_budget(scores, sizes, 2, 3, bpw_of, a.budget)
        elif pl == "shiftaddllm-80-20":  # the paper's fractions (a smaller size than the budget)
            plans[pl] = A.sort_and_threshold(scores, sizes, {2: 0.8, 3: 0.2})
        elif pl == "mp-calib-80-20":  # ours at the size of the paper's 80/20 plan
            b8020 = A.average_bits(A.sort_and_threshold(scores, sizes, {2: 0.8, 3: 0.2}), sizes, bpw_of)
            plans[pl] = A.allocate(table.matrix("calib"), sizes, widths, bpw, b8020)["bits"]
        elif pl == "random":
            for s in range(a.random):
                plans[f"random-{s}"] = A.random_allocation(sizes, widths, bpw_of, a.budget, seed=s)
        elif pl.startswith("random-"):  # one random plan by its seed (the same plan "random" makes)
            plans[pl] = A.random_allocation(sizes, widths, bpw_of, a.budget, seed=int(pl.split("-")[1]))
        elif pl.startswith("uniform-"):
            plans[pl] = np.full(len(sizes), int(pl.split("-")[1]))
        elif pl != "fp32":
            raise SystemExit(f"--plans: unknown plan '{pl}'")

    out_json = a.out
    rows = []
    prev = {}
    if os.path.exists(out_json + ".partial"):  # resume: plans already evaluated with the same settings
        prev = {r["plan"]: r for r in json.load(open(out_json + ".partial"))["rows"]
                if r.get("tokens") == a.tokens and r.get("budget") == a.budget}

    def evaluate(name, path):
        t0 = time.perf_counter()
        r = shiftc.api.evaluate(path, tokens=a.tokens, window=a.window, threads=a.threads)
        timings[f"ppl {name}"] = round(time.perf_counter() - t0, 1)
        return r

    names = table.names()
    # free the source model before evaluating (each plan reloads it; ONNX Runtime needs the memory)
    for t in targets:
        wd(t.name)
    for x in {t.x for t in targets}:
        hd(x)
    del model
    inits = None
    import gc

    gc.collect()

    def weight(name):  # only a cache miss needs W again: read it from the source file
        t = by_name[name]
        src = {i.name: i for i in load_model(a.model).graph.initializer}
        w = numpy_helper.to_array(src[t.weight]).astype(np.float32)
        return w.T if t.transposed else w
    for name in (["fp32"] if "fp32" in plans_wanted else []) + list(plans):
        if name in prev:
            rows.append(prev[name])
            continue
        if name == "fp32":
            r = evaluate(name, a.model)
            rows.append({"plan": name, "perplexity": r["perplexity"], "bits_per_weight": 32.0, "tokens": a.tokens,
                         "budget": a.budget})
        else:
            bits = plans[name]
            t0 = time.perf_counter()
            plan_bits = dict(zip(names, bits))
            fresh = load_model(a.model)
            with_weights(fresh, targets, lambda n: result(n, plan_bits[n]).dequantize(), in_place=True)
            path = os.path.join(a.work, f"plan_eval_{os.getpid()}.onnx")
            save_model(fresh, path)
            del fresh
            import gc

            gc.collect()
            timings[f"assemble {name}"] = round(time.perf_counter() - t0, 1)
            r = evaluate(name, path)
            os.remove(path)
            row = {"plan": name, "perplexity": r["perplexity"], "bits_per_weight": A.average_bits(bits, sizes, bpw_of),
                   "tokens": a.tokens, "tokens_scored": r["tokens_scored"], "budget": a.budget,
                   "widths": {str(b): int(np.sum(bits == b)) for b in widths},
                   "predicted": {k: float(table.matrix(k)[np.arange(len(bits)), [widths.index(int(b)) for b in bits]].sum())
                                 for k in kinds},
                   "layer_bits": {n: int(b) for n, b in zip(names, bits)}}
            rows.append(row)
        with open(out_json + ".partial", "w") as f:
            json.dump({"rows": rows, "timings_s": timings}, f, indent=1)
        print(f"  {name}: ppl {rows[-1]['perplexity']:.3f}", file=sys.stderr, flush=True)

    rand = [r["perplexity"] for r in rows if r["plan"].startswith("random-")]
    summary = {}
    by = {r["plan"]: r["perplexity"] for r in rows}
    if rand:
        summary["random_mean"] = float(np.mean(rand))
    for ours in ("mp-calib", "mp-hawq", "mp-kl"):
        if ours in by:
            if "shiftaddllm" in by:
                summary[f"{ours} / shiftaddllm"] = by[ours] / by["shiftaddllm"]
            if rand:
                summary[f"{ours} / random mean"] = by[ours] / float(np.mean(rand))
    result = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", "budget_bits_per_weight": a.budget,
              "candidates": widths, "group": a.group, "scale_mode": "pow2", "tokens": a.tokens, "window": a.window,
              "corpus": "wikipedia/eval", "threads": a.threads, "calibration": f"{a.calib_windows}x{a.calib_window} tokens",
              "rank_agreement_calib_vs_hawq": rank_agreement(table) if "hawq" in kinds else None,
              "rank_agreement_calib_vs_kl": rank_agreement(table, ("calib", "kl")) if "kl" in kinds else None,
              "rank_agreement_hawq_vs_kl": rank_agreement(table, ("hawq", "kl")) if {"hawq", "kl"} <= set(kinds) else None,
              "hawq": table.info.get("hawq"), "latency_model": latency_info, "summary": summary, "rows": rows, "timings_s": timings}
    write_results(out_json, result)
    print(f"SmolLM2-135M, {a.budget} bits/weight budget, perplexity on {a.tokens} held-out tokens (window {a.window})")
    print(f"{'plan':22} {'ppl':>10} {'bits/w':>7}  widths")
    for r in rows:
        print(f"{r['plan']:22} {r['perplexity']:10.3f} {r['bits_per_weight']:7.3f}  {r.get('widths', '')}")
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")
    for key in ("calib_vs_hawq", "calib_vs_kl", "hawq_vs_kl"):
        if result[f"rank_agreement_{key}"]:
            print(f"Kendall tau {key}:", {k: round(v["tau"], 3) for k, v in result[f"rank_agreement_{key}"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
