"""Latency-budgeted mixed precision on SmolLM2-135M: does the compiled model meet the budget, and
what does it cost in perplexity against the size-only plan at the same size?

Protocol (every model from the same per-layer quantizations, cached once per layer and width by
bench_mixed_precision.py: group 128, power-of-two scales, GPTQ without act-order, widths {2, 3};
sensitivity: output KL of each layer alone quantized):

  1. kernel times t_i(b): the LUT kernel per layer shape and width (decode, one row of x, one
     thread; latency.layer_times), saved once to WORK/kernel_times.json;
  2. the fixed cost (everything that is not a quantized layer's kernel: attention, norms,
     embedding, runtime): two *calibration* plans — uniform 2-bit and uniform 3-bit — are compiled
     and their decode time measured; latency.fit_fixed_cost gives t_other (and the in-model scale
     of the kernel times, reported but not used unless --fit-scale);
  3. (a) the size-only plan: MILP at --budget bits per weight; (b) latency budgets below it,
     L = f x (the size-only plan's measured decode ms/token), f from --fractions; the latency plan
     is the MILP at the same size budget with Σ t_i(b_i) <= L·(1 − --latency-margin) − t_other
     (the margin: room for the latency model's error, as ``shiftc compress --latency-margin``);
     with --tokens > 0 its perplexity at --tokens picks the tightest f whose plan stays within
     --max-loss, with --tokens 0 the tightest feasible f is taken;
     (b') the size-only plan at the latency plan's own size: MILP at the latency plan's average
     bits per weight, no latency budget (``size-only@<bpw>``) — the other reading of "the
     size-only plan at the same size";
  4. (c) all compiled plans' decode time measured in one run, alternating (shiftc.timing.alternate;
     one token on a 128-token KV cache, restored before every step, same thread count), and the
     prediction error of the latency model on the plans it was not fitted on; the budget is met
     when the 95% bootstrap interval of the median paired ratio (latency plan / size-only plan,
     per round) lies below f;
  5. (d) perplexity of the size-only, size-only@<bpw> and the chosen latency plan (ONNX Runtime,
     window 512, held-out split) at --tokens-final.

The run of benchmarks/results/mixed_precision_latency.json (1 thread; the compressed models of
uniform-2/uniform-3/head3/head2/size-only and size-only's 32k perplexity are the earlier run's, from
out/bench/mpl, linked into the new --out-dir; calibration on a quiet machine, the timing runs beside a
1-thread PyTorch job):

    B="OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_mixed_precision_latency.py --out-dir out/bench/mpl8"
    $B --stage calibrate --rounds 300
    A="--fractions 0.96 --latency-margin 0.01 --tokens 0 --tokens-final 32768"
    $B $A --rounds 600     # compiles, first timing (600 rounds), the perplexities
    $B $A --rounds 1500 --retime              # timing again, 1500 rounds
    $B $A --rounds 1500 --retime --recompile  # every library compiled again: the run in the JSON

(earlier timing runs of this state under ``final_runs_previous``; the earlier result files —
--fractions 0.995,0.99,... --tokens 8192, no margin — under ``previous_runs``.)

Run 4 (the current ``run`` of the JSON): calibration and final timing in one invocation, so that
the budget in milliseconds is checked against a calibration minutes old, not hours; a fresh
--out-dir holding only state.json's ``kernel_times`` and the fixed plans' files (uniform-2/3,
head3/head2, size-only) and perplexities:

    $B --fractions 0.96 --latency-margin 0.01 --tokens 0 --tokens-final 32768 --rounds 800

Run 5: the same, on a quiet machine (nothing else running): the size-only library was again
slower in the final run than in the calibration run (+5.3% in 8 minutes; +6.5% in run 3). The
calibration timed three libraries in rotation, the final run seven; since then the calibration
times all five fixed plans (CALIBRATION_PLANS), so that the budget in milliseconds is measured
under the conditions it is checked in. Run 6 (a fresh --out-dir as for run 4, quiet machine;
0.96 was infeasible on that calibration — all-2-bit predicted at 0.956 — so --fractions 0.97):
every library was again 3.5–7.4% slower in the final run than in the calibration 14 minutes
earlier, the same five libraries in both, so the rotation is not the cause; the paired ratio is
unaffected by it, the absolute reading is not.

Since session 7 the chosen plan goes through the closed loop of ``shiftc compress
--latency-verify`` before the final timing (``--verify N``, ``--verify-rounds``): compiled, timed
beside uniform-2, uniform-3 and size-only, and planned again on a refitted model while it measures
over budget x (1 - margin). Three such runs at ``--budget 2.9 --fractions 0.94`` (the JSON's
``closed_loop_attempts``) found every library 14-17% slower at the closed-loop timing than at the
calibration minutes earlier and stopped with the budget unattainable.

The verdict states both readings: ``meets_budget`` (the paired ratio's interval below f) and
``meets_absolute_budget`` (the bootstrap interval of the latency plan's median ms at or below the
budget in ms), with the minutes between calibration and timing and the size-only plan's drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from common import read_results, work_dir, write_results


class Setup:
    """The source model, pinned quantizer settings, the per-layer cache and the sensitivity table."""

    def __init__(self, a):
        from onnx import numpy_helper

        from bench_mixed_precision import LazyH
        from shiftc.frontend.onnx_io import load_model
        from shiftc.passes.mixed_precision.cache import LayerCache, digest, result_key
        from shiftc.passes.mixed_precision.sensitivity import SensitivityTable, quantize_layer
        from shiftc.passes.shiftadd import ShiftAddConfig, ShiftAddPass

        self.a = a
        self.widths = [int(b) for b in a.candidates.split(",")]
        self.cfg = ShiftAddConfig(group=a.group, scale_mode="pow2", act_order=False, damp=0.01, iters=6)
        self.model = load_model(a.model)
        self.targets, _ = ShiftAddPass(self.cfg).match(self.model)
        self.by_name = {t.name: t for t in self.targets}
        inits = {t.name: t for t in self.model.graph.initializer}
        self.inits = inits
        hpath = os.path.join(a.work, "hessians.npz")
        if not os.path.exists(hpath):
            raise SystemExit(f"{hpath} missing: run benchmarks/bench_mixed_precision.py first (it writes H, "
                             f"the tables and the output KL)")
        self.hs = LazyH(np.load(hpath))
        self.cache = LayerCache(a.cache or os.path.join(a.work, "cache"))
        self._wd, self._hd = {}, {}
        self._digest, self._result_key, self._quantize_layer = digest, result_key, quantize_layer
        self._np = numpy_helper
        table = SensitivityTable.merged([SensitivityTable.load(os.path.join(a.work, f"table_b{b}.json"))
                                         for b in self.widths], self.widths)
        kl = json.load(open(os.path.join(a.work, "kl.json")))["kl"]
        for ly in table.layers:
            ly.kl = {int(b): v for b, v in kl[ly.name].items()}
        self.table = table
        self.names = table.names()

    def seed_kl_cache(self, windows: int = 2, window: int = 128) -> int:
        """Store the table's output-KL values in the cache under the keys ``shiftc compress
        --sensitivity kl --mp-cache`` looks them up by (e2e.kl_cache_keys), so that the CLI run of
        the protocol needs no forward pass per layer. Returns the number of values stored."""
        from shiftc.passes.calibration import calibration_windows
        from shiftc.passes.mixed_precision.e2e import kl_cache_keys

        ids = calibration_windows(self.model, windows=windows, window=window, model_path=self.a.model)
        weights = {n: self.weight(n) for n in self.names}
        keys = kl_cache_keys(self.model, self.targets, weights, self.hs, self.cfg, self.widths, ids)
        by = {ly.name: ly for ly in self.table.layers}
        self.cache.put_values("kl", {k: by[n].kl[b] for (n, b), k in keys.items()})
        return len(keys)

    def weight(self, name):
        t = self.by_name[name]
        w = self._np.to_array(self.inits[t.weight]).astype(np.float32)
        return w.T if t.transposed else w

    def result(self, name, b):
        t = self.by_name[name]
        if name not in self._wd:
            self._wd[name] = self._digest(self.weight(name))
        if t.x not in self._hd:
            self._hd[t.x] = self._digest(self.hs[t.x])
        k = self.inits[t.weight].dims[0 if t.transposed else 1]
        key = self._result_key(name, self._wd[name], self._hd[t.x], int(b), self.cfg)
        r = self.cache.get(name, int(b), key, int(k), self.cfg.group, self.cfg.scale_mode)
        if r is None:
            r = self._quantize_layer(name, self.weight(name), self.hs[t.x], int(b), self.cfg, self.cache,
                                     self._wd[name], self._hd[t.x])
        return r

    def compressed(self, layer_bits: dict, path: str) -> str:
        """The BcqMatMul model of a plan (what ``shiftc compress`` writes), from the cache."""
        from shiftc.frontend.onnx_io import save_model
        from shiftc.passes.shiftadd import ShiftAddPass

        sidecar = path + ".bits.json"  # the plan a file holds: a plan of the same name but other bits is rebuilt
        want = {n: int(layer_bits[n]) for n in self.names}
        if os.path.exists(path) and (not os.path.exists(sidecar) or json.load(open(sidecar)) == want):
            return path
        results = {n: self.result(n, layer_bits[n]) for n in self.names}
        out = ShiftAddPass(self.cfg)(self.model, results=results).model
        save_model(out, path + ".tmp.onnx")
        os.replace(path + ".tmp.onnx", path)
        with open(sidecar, "w") as f:
            json.dump(want, f)
        return path

    def dequantized(self, layer_bits: dict, path: str) -> str:
        """fp32 model with Ŵ written back (same logits as the BcqMatMul model, fast to load in ORT)."""
        from shiftc.frontend.onnx_io import load_model, save_model
        from shiftc.passes.mixed_precision.assemble import with_weights

        fresh = load_model(self.a.model)
        with_weights(fresh, self.targets, lambda n: self.result(n, layer_bits[n]).dequantize(), in_place=True)
        save_model(fresh, path)
        return path


def compile_plan(onnx_path: str, so: str) -> float:
    from shiftc.backend.compile import compile_model

    if os.path.exists(so) and os.path.getmtime(so) >= os.path.getmtime(onnx_path):
        return 0.0
    t0 = time.perf_counter()
    compile_model(onnx_path, so)
    return round(time.perf_counter() - t0, 1)


#: the fixed plans, timed together in the calibration run and again in the final run
CALIBRATION_PLANS = ("uniform-2", "uniform-3", "head3", "head2", "size-only")


def median_ci95(x) -> list[float]:
    """Bootstrap 95% interval of the median of ``x`` (2,000 resamples, seed 0)."""
    x = np.asarray(x, dtype=float)
    boot = np.median(x[np.random.default_rng(0).integers(0, len(x), (2000, len(x)))], axis=1)
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def time_decode(libs: dict[str, str], threads: int, rounds: int) -> dict[str, list[float]]:
    """ms per decode step of each compiled library, alternating (latency.decode_ms: one token on a
    128-token KV cache, restored before every step)."""
    import shiftc.api
    from shiftc.passes.mixed_precision.latency import decode_ms

    return decode_ms(libs, load=shiftc.api.load, threads=threads, rounds=rounds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(work_dir("sa"), "smol.onnx"))
    p.add_argument("--work", default=work_dir("mp"), help="bench_mixed_precision.py's folder (H, tables, kl.json, cache)")
    p.add_argument("--cache", default=None)
    p.add_argument("--out-dir", default=work_dir("mpl"), help="compressed models and libraries")
    p.add_argument("--budget", type=float, default=2.5)
    p.add_argument("--candidates", default="2,3")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--kind", default="kl", help="sensitivity the plans minimise")
    p.add_argument("--fractions", default="0.99", help="latency budgets as fractions of the size-only plan's measured ms")
    p.add_argument("--extra-fractions", default="", help="more latency plans compiled and timed in the final run")
    p.add_argument("--latency-margin", type=float, default=None,
                   help="plan against the budget x (1 - margin) (default: MixedPrecisionConfig's, 0.01)")
    p.add_argument("--max-loss", type=float, default=0.10, help="perplexity loss allowed vs the size-only plan")
    p.add_argument("--tokens", type=int, default=8192,
                   help="tokens for choosing the fraction (0: no perplexity sweep, the tightest feasible fraction)")
    p.add_argument("--tokens-final", type=int, default=0, help="final perplexity of the two plans (0: skip)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--kernel-repeats", type=int, default=12, help="rounds over all (shape, width) kernel timings")
    p.add_argument("--unit-scale", action="store_true", help="fit t = t_other + Σt_i (default: t_other + s·Σt_i)")
    p.add_argument("--stage", default="all", choices=["calibrate", "choose", "all"],
                   help="calibrate: fixed cost only; choose: + perplexity sweep; all: + final timing/perplexity")
    p.add_argument("--verify", type=int, default=2,
                   help="closed loop (shiftc compress --latency-verify): compiled plans measured before one is accepted")
    p.add_argument("--verify-rounds", type=int, default=300, help="decode steps per library in each verification timing")
    p.add_argument("--retime", action="store_true", help="measure the final run again (the earlier one is kept)")
    p.add_argument("--recompile", action="store_true",
                   help="with --retime: compile every library of the final run again (same kernel code for all)")
    p.add_argument("--seed-kl-cache", action="store_true",
                   help="store the output-KL table in the cache for `shiftc compress --sensitivity kl --mp-cache`, and exit")
    p.add_argument("--out", default="benchmarks/results/mixed_precision_latency.json")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    os.makedirs(a.out_dir, exist_ok=True)

    import shiftc.api
    from shiftc.passes.mixed_precision import allocate as A
    from shiftc.passes.mixed_precision import latency as LT

    if a.latency_margin is None:
        from shiftc.passes.mixed_precision.config import MixedPrecisionConfig

        a.latency_margin = MixedPrecisionConfig().latency_margin
    margin = float(a.latency_margin)
    S = Setup(a)
    if a.seed_kl_cache:
        print(f"stored {S.seed_kl_cache()} output-KL values in {S.cache.folder}")
        return 0
    table, widths = S.table, S.widths
    sizes, bpw = table.sizes(), table.bits_per_weight()
    bpw_of = dict(zip(widths, map(float, bpw)))
    sens = table.matrix(a.kind)
    shapes = [ly.shape for ly in table.layers]
    state_path = os.path.join(a.out_dir, "state.json")
    state = json.load(open(state_path)) if os.path.exists(state_path) else {}
    state.setdefault("run", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def save_state():
        with open(state_path + ".tmp", "w") as f:
            json.dump(state, f, indent=1)
        os.replace(state_path + ".tmp", state_path)

    # 1. kernel times (measured once: every plan is predicted from the same table)
    if "kernel_times" not in state:
        t, per_shape = LT.layer_times(shapes, widths, a.group, threads=a.threads, repeats=a.kernel_repeats)
        state["kernel_times"] = {"per_shape_ms": per_shape, "threads": a.threads, "rows": 1}
        save_state()
    times = LT.times_from_table(shapes, widths, state["kernel_times"]["per_shape_ms"])

    def kernel_ms(bits):
        return float(sum(times[i, widths.index(int(b))] for i, b in enumerate(bits)))

    plans: dict[str, np.ndarray] = {f"uniform-{b}": np.full(len(sizes), b) for b in widths}
    # validation plans for the latency model: the LM head (a fifth of the weights) at the other width
    head = np.array(["model.layers." not in n for n in S.names])
    plans["head3"] = np.where(head, widths[-1], widths[0])
    plans["head2"] = np.where(head, widths[0], widths[-1])
    size_only = A.allocate(sens, sizes, widths, bpw, a.budget, times=times)
    plans["size-only"] = size_only["bits"]
    timings = state.setdefault("timings_s", {})

    def lib(name):
        bits = plans[name]
        onnx_path = S.compressed(dict(zip(S.names, map(int, bits))), os.path.join(a.out_dir, f"{name}.onnx"))
        so = os.path.join(a.out_dir, f"{name}.so")
        c = compile_plan(onnx_path, so)
        if c:
            timings[f"compile {name}"] = c
            save_state()
        return so

    # 2. fixed cost from the two uniform plans (+ the size-only plan's measured time, for the budget).
    # All five fixed plans are timed, in rotation, so that the calibration runs under the same
    # conditions as the final timing (which adds only the one or two new plans). This did not remove
    # the calibration-to-timing slowdown (run 6 in the module doc): its cause is not the rotation.
    if "calibration_run" not in state:
        libs = {n: lib(n) for n in CALIBRATION_PLANS}
        ms = time_decode(libs, a.threads, a.rounds)
        state["calibration_run"] = {"median_ms": {k: float(np.median(v)) for k, v in ms.items()},
                                    "kernel_ms": {k: kernel_ms(plans[k]) for k in libs}, "rounds": a.rounds,
                                    "at": time.time()}
        save_state()
    cal = state["calibration_run"]
    FIT = ("uniform-2", "uniform-3", "size-only")  # least squares over three calibration plans
    fit = LT.fit_fixed_cost([cal["kernel_ms"][k] for k in FIT], [cal["median_ms"][k] for k in FIT],
                            fit_scale=not a.unit_scale)
    state["fit"] = fit
    other, scale = fit["other_ms"], fit["scale"]
    pred_size_only = other + scale * kernel_ms(plans["size-only"])
    measured_size_only = cal["median_ms"]["size-only"]
    print(f"fixed cost {other:.2f} ms (scale {scale:.3f}); size-only plan: predicted {pred_size_only:.2f} ms, "
          f"measured {measured_size_only:.2f} ms ({100 * (pred_size_only / measured_size_only - 1):+.1f}%)", flush=True)
    save_state()
    if a.stage == "calibrate":
        return 0

    # 3. latency plans at the fractions; perplexity at --tokens picks the tightest within max_loss
    sweep = state.setdefault("sweep", {})

    def plan_id(name):
        return "".join(map(str, map(int, plans[name])))

    def ppl(name, tokens):
        key = f"{name}@{tokens}"
        known = state.setdefault("perplexity", {}).get(key)
        if known is not None and known.get("plan", plan_id(name)) != plan_id(name):
            del state["perplexity"][key]  # a plan of the same name, other bits (e.g. after a new calibration)
        if key not in state["perplexity"]:
            for other, bits in plans.items():  # the same plan under another name: same numbers (deterministic)
                done = state["perplexity"].get(f"{other}@{tokens}")
                if other != name and done and np.array_equal(bits, plans[name]) and done.get("plan", plan_id(other)) == plan_id(other):
                    state["perplexity"][key] = {**done, "same_plan_as": other, "plan": plan_id(name)}
                    save_state()
                    print(f"  {key}: the same plan as {other} (ppl {done['perplexity']:.2f})", flush=True)
                    return done["perplexity"]
            t0 = time.perf_counter()
            path = S.dequantized(dict(zip(S.names, map(int, plans[name]))), os.path.join(a.out_dir, "eval.onnx"))
            r = shiftc.api.evaluate(path, tokens=tokens, window=a.window, threads=a.threads)
            os.remove(path)
            state["perplexity"][key] = {"perplexity": r["perplexity"], "tokens_scored": r["tokens_scored"],
                                        "plan": plan_id(name)}
            timings[f"ppl {key}"] = round(time.perf_counter() - t0, 1)
            save_state()
            print(f"  {key}: ppl {r['perplexity']:.2f}", flush=True)
        return state["perplexity"][key]["perplexity"]

    base = ppl("size-only", a.tokens) if a.tokens else None
    chosen = None
    for f in sorted(map(float, a.fractions.split(",")), reverse=True):
        budget_ms = f * measured_size_only
        name = f"latency-{f:g}"
        try:
            r = A.allocate(sens, sizes, widths, bpw, a.budget, times=scale * times,
                           latency_budget=budget_ms * (1 - margin) - other)
        except Exception as e:  # infeasible
            sweep[name] = {"fraction": f, "budget_ms": budget_ms, "margin": margin, "feasible": False, "why": str(e)}
            break
        plans[name] = r["bits"]
        loss = ppl(name, a.tokens) / base - 1 if a.tokens else None
        sweep[name] = {"fraction": f, "budget_ms": budget_ms, "margin": margin,
                       "planned_ms": budget_ms * (1 - margin), "feasible": True,
                       "predicted_ms": other + r["latency"], "avg_bits": r["avg_bits"], "objective": r["objective"],
                       "ppl_loss": loss, "widths": {str(b): int(np.sum(r["bits"] == b)) for b in widths},
                       "layer_bits": dict(zip(S.names, map(int, r["bits"])))}
        save_state()
        if loss is None or loss <= a.max_loss:
            chosen = name
        else:
            break
    # 3'. the closed loop of `shiftc compress --latency-verify` (latency.close_loop): the chosen plan
    # compiled and timed beside the calibration plans FIT; over its planned ms, the latency model
    # refitted on those timings and the plan made again. The plan it accepts (or its last) goes on.
    if chosen is not None and a.verify:
        if a.retime or state.get("verify", {}).get("from") != chosen or state["verify"].get("plan") is None:
            base_name, planned = chosen, sweep[chosen]["planned_ms"]
            names_by_bits = {plan_id(chosen): chosen}

            def as_plan(bits, fx_other, fx_scale):
                bits = np.asarray(bits)
                return {"layer_bits": dict(zip(S.names, map(int, bits))), "avg_bits": A.average_bits(bits, sizes, bpw_of),
                        "latency": {"planned_ms": planned, "predicted_ms": fx_other + fx_scale * kernel_ms(bits)}}

            def replan(fx):
                r = A.allocate(sens, sizes, widths, bpw, a.budget, times=fx["scale"] * times,
                               latency_budget=planned - fx["other_ms"])
                return as_plan(r["bits"], fx["other_ms"], fx["scale"])

            def build(layer_bits):
                bits = np.array([layer_bits[n] for n in S.names])
                key = "".join(map(str, bits))
                if key not in names_by_bits:
                    names_by_bits[key] = f"{base_name}-v{len(names_by_bits) + 1}"
                plans[names_by_bits[key]] = bits
                return lib(names_by_bits[key])

            def time_libs(libs):
                ms = time_decode(libs, a.threads, a.verify_rounds)
                out = {k: float(np.median(v)) for k, v in ms.items()}
                print("  verify: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()) + " ms", flush=True)
                return out

            calib = {k: (lib(k), cal["kernel_ms"][k]) for k in FIT}
            out = LT.close_loop(as_plan(plans[chosen], other, scale), replan, build, time_libs,
                                lambda lb: kernel_ms([lb[n] for n in S.names]), calib, iterations=a.verify)
            bits = np.array([out["layer_bits"][n] for n in S.names])
            name = names_by_bits["".join(map(str, bits))]
            if name != chosen:
                sweep[name] = {**sweep[chosen], "predicted_ms": out["latency"]["predicted_ms"],
                               "avg_bits": out["avg_bits"], "widths": {str(b): int(np.sum(bits == b)) for b in widths},
                               "layer_bits": out["layer_bits"], "verified_from": chosen}
            state["verify"] = {"from": chosen, "plan": name, "rounds": a.verify_rounds, "calibration_plans": list(FIT),
                               **out["latency"]["verify"], "at": time.time()}
            save_state()
        chosen = state["verify"]["plan"]
        plans[chosen] = np.array([sweep[chosen]["layer_bits"][n] for n in S.names])
    state["chosen"] = chosen
    same_size = None
    if chosen is not None:  # the size-only plan at the latency plan's own size
        plans[chosen] = np.array([sweep[chosen]["layer_bits"][n] for n in S.names])
        lat_bits = A.average_bits(plans[chosen], sizes, bpw_of)
        same_size = f"size-only@{lat_bits:.3f}"
        r = A.allocate(sens, sizes, widths, bpw, lat_bits, times=times)
        plans[same_size] = r["bits"]
        state["same_size_plan"] = {"name": same_size, "budget_bits": lat_bits, "avg_bits": r["avg_bits"],
                                   "objective": r["objective"],
                                   "predicted_ms": other + scale * kernel_ms(r["bits"]),
                                   "widths": {str(b): int(np.sum(r["bits"] == b)) for b in widths},
                                   "layer_bits": dict(zip(S.names, map(int, r["bits"])))}
    save_state()
    if chosen is None:
        print("no latency budget in --fractions keeps the perplexity within the limit")
    if a.stage == "choose" or chosen is None:
        return 0

    # 4. all compiled plans timed together; prediction error on the plans not used for the fit
    extra = []
    for f in filter(None, a.extra_fractions.split(",")):
        name = f"latency-{float(f):g}"
        plans[name] = A.allocate(sens, sizes, widths, bpw, a.budget, times=scale * times,
                                 latency_budget=float(f) * measured_size_only * (1 - margin) - other)["bits"]
        extra.append(name)
    if state.get("final_run", {}).get("chosen") != chosen or a.retime:
        if "final_run" in state:
            state.setdefault("final_runs_previous", []).append(state.pop("final_run"))
        final_plans = (*CALIBRATION_PLANS, same_size, chosen, *extra)
        if a.recompile:
            for n in final_plans:
                so = os.path.join(a.out_dir, f"{n}.so")
                if os.path.exists(so):
                    os.remove(so)
        libs = {n: lib(n) for n in final_plans}
        ms = time_decode(libs, a.threads, a.rounds)
        ratio = {k: [x / y for x, y in zip(v, ms["size-only"])] for k, v in ms.items()}  # per round, paired
        state["final_run"] = {"chosen": chosen, "rounds": a.rounds, "median_ms": {k: float(np.median(v)) for k, v in ms.items()},
                              "median_ratio_to_size_only": {k: float(np.median(v)) for k, v in ratio.items()},
                              "ratio_q25": {k: float(np.percentile(v, 25)) for k, v in ratio.items()},
                              "ratio_q75": {k: float(np.percentile(v, 75)) for k, v in ratio.items()},
                              "q25_ms": {k: float(np.percentile(v, 25)) for k, v in ms.items()},
                              "q75_ms": {k: float(np.percentile(v, 75)) for k, v in ms.items()},
                              "p10_ms": {k: float(np.percentile(v, 10)) for k, v in ms.items()},
                              "ratio_p10_to_size_only": {k: float(np.percentile(v, 10) / np.percentile(ms["size-only"], 10))
                                                         for k, v in ms.items()},
                              "ms": {k: [round(x, 3) for x in v] for k, v in ms.items()},
                              "kernel_ms": {k: kernel_ms(plans[k]) for k in libs}, "at": time.time()}
        save_state()
    fr = state["final_run"]
    fit2 = LT.fit_fixed_cost([fr["kernel_ms"][k] for k in FIT], [fr["median_ms"][k] for k in FIT],
                             fit_scale=not a.unit_scale)
    rows = {}
    for k in fr["median_ms"]:
        pred = fit2["other_ms"] + fit2["scale"] * fr["kernel_ms"][k]
        rows[k] = {"measured_ms": fr["median_ms"][k], "predicted_ms": pred, "fitted_on": k in FIT,
                   "error": pred / fr["median_ms"][k] - 1, "kernel_ms": fr["kernel_ms"][k],
                   "avg_bits": A.average_bits(plans[k], sizes, bpw_of)}
    f = sweep[chosen]["fraction"]
    budget_measured = f * fr["median_ms"]["size-only"]  # the budget, against this run's size-only time

    def ci95(k):  # bootstrap 95% interval of the median paired ratio k / size-only (rounds resampled)
        return median_ci95(np.array(fr["ms"][k]) / np.array(fr["ms"]["size-only"]))

    ci = ci95(chosen)
    ci_ms = median_ci95(fr["ms"][chosen])
    same = state.get("same_size_plan", {}).get("name")
    identical = bool(same and same in fr["ms"] and np.array_equal(plans[same], plans[chosen]))
    verdict = {"fraction": f, "budget_ms": sweep[chosen]["budget_ms"],
               "budget_from": "fraction x the size-only plan's median decode ms in the calibration run",
               "latency_margin": sweep[chosen].get("margin", 0.0), "planned_ms": sweep[chosen].get("planned_ms"),
               "predicted_ms": sweep[chosen]["predicted_ms"],
               "measured_ms": fr["median_ms"][chosen], "measured_ms_ci95": ci_ms,
               "meets_absolute_budget": ci_ms[1] <= sweep[chosen]["budget_ms"],
               "meets_absolute_budget_rule": "the 95% bootstrap interval of the latency plan's median decode ms "
                                             "lies at or below budget_ms (the budget it was planned against)",
               "minutes_from_calibration_to_timing": (round((fr["at"] - cal["at"]) / 60, 1)
                                                      if "at" in fr and "at" in cal else None),
               "size_only_measured_ms": fr["median_ms"]["size-only"],
               "size_only_drift": fr["median_ms"]["size-only"] / cal["median_ms"]["size-only"] - 1,
               "budget_ms (this run)": budget_measured,
               "median_paired_ratio": fr["median_ratio_to_size_only"][chosen], "paired_ratio_ci95": ci,
               "meets_budget": ci[1] < f,
               "meets_budget_rule": "the 95% interval of the median paired ratio (latency plan / size-only, per "
                                    "round) lies below the fraction",
               "speedup_vs_size_only": fr["median_ms"]["size-only"] / fr["median_ms"][chosen],
               "paired_ratio_ci95_all": {k: ci95(k) for k in fr["ms"]}}
    # every timing run of this state (earlier ones: --retime), for the run-to-run spread
    runs = [*state.get("final_runs_previous", []), fr]
    verdict["all_timing_runs"] = []
    for run in runs:
        if run.get("chosen") != chosen or "ms" not in run:
            continue
        row = {"rounds": run["rounds"]}
        for k in dict.fromkeys((chosen, same)):
            if k and k in run["ms"]:
                r = np.array(run["ms"][k]) / np.array(run["ms"]["size-only"])
                c = median_ci95(r)
                row[k] = {"median_paired_ratio": float(np.median(r)), "ci95": c, "meets_budget": c[1] < f}
        verdict["all_timing_runs"].append(row)
    if identical:  # the same plan compiled and timed twice: what a difference of nothing measures
        r = np.array(fr["ms"][chosen]) / np.array(fr["ms"][same])
        verdict["a_a_check"] = {
            "plans": [chosen, same], "note": "the latency plan and the size-only plan at its size are the same "
                                             "plan (identical layer widths), compiled into two libraries",
            "median_paired_ratio": float(np.median(r)),
            "ci95": median_ci95(r),
            "meets_budget_if_timed_as_the_other": ci95(same)[1] < f}

    # 5. final perplexity
    final = {}
    if a.tokens_final:
        same_size = state.get("same_size_plan", {}).get("name")
        for k in ("size-only", same_size, chosen):
            if k:
                final[k] = ppl(k, a.tokens_final)
        final["loss"] = final[chosen] / final["size-only"] - 1
        avg = {k: A.average_bits(plans[k], sizes, bpw_of) for k in ("size-only", same_size, chosen) if k}
        verdict["perplexity"] = {
            "tokens": a.tokens_final,
            "latency_plan": {"name": chosen, "bits_per_weight": avg[chosen], "perplexity": final[chosen]},
            "(a) size-only at the size budget": {
                "name": "size-only", "bits_per_weight": avg["size-only"], "perplexity": final["size-only"],
                "loss": final[chosen] / final["size-only"] - 1,
                "within_max_loss": final[chosen] / final["size-only"] - 1 <= a.max_loss}}
        if same_size:
            final[f"loss vs {same_size}"] = final[chosen] / final[same_size] - 1
            verdict["perplexity"]["(b) size-only at the latency plan's size"] = {
                "name": same_size, "bits_per_weight": avg[same_size], "perplexity": final[same_size],
                "loss": final[chosen] / final[same_size] - 1,
                "within_max_loss": final[chosen] / final[same_size] - 1 <= a.max_loss,
                "identical_plan": bool(np.array_equal(plans[same_size], plans[chosen]))}
        for k in fr["median_ms"]:  # other latency plans evaluated earlier at the same token count
            key = f"{k}@{a.tokens_final}"
            if k.startswith("latency-") and k != chosen and key in state.get("perplexity", {}):
                final[k] = state["perplexity"][key]["perplexity"]
                final[f"loss {k}"] = final[k] / final["size-only"] - 1
    result = {"run": state["run"], "model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)",
              "budget_bits_per_weight": a.budget, "latency_margin": margin,
              "same_size_plan": state.get("same_size_plan"),
              "candidates": widths, "group": a.group, "scale_mode": "pow2", "sensitivity": a.kind,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": a.threads,
              "decode": "1 token on a 128-token KV cache, median of alternating rounds",
              "kernel_times": state["kernel_times"], "fit_calibration_run": state["fit"], "fit_final_run": fit2,
              "calibration_run": cal, "sweep": sweep, "chosen": chosen, "final_run": fr, "models": rows,
              "final_runs_previous": state.get("final_runs_previous", []),
              "verdict": verdict, "verify": state.get("verify"), "perplexity": state.get("perplexity"), "final_perplexity": final,
              "window": a.window, "timings_s": timings}
    previous = []
    if os.path.exists(a.out):  # earlier runs' results are kept (in the full result), not overwritten
        old = read_results(a.out)
        previous = old.pop("previous_runs", [])
        if old.get("run") != state["run"]:
            previous = [*previous, old]
    result["previous_runs"] = previous
    write_results(a.out, result)
    for k, r in rows.items():
        print(f"{k:16s} measured {r['measured_ms']:7.2f} ms  predicted {r['predicted_ms']:7.2f} ms "
              f"({100 * r['error']:+.1f}%)  {r['avg_bits']:.3f} b/w")
    print(json.dumps(verdict, indent=1))
    if final:
        print(f"perplexity at {a.tokens_final}: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
