"""Latency model for the allocation: decode time per token from measured kernel times.

    t(plan) = t_other + s · Σ_i t(N_i, K_i, b_i)

t(N, K, b): the LUT kernel's time (``shiftc._native.bcq_matmul_lut16``, the code the compiled
library runs; csrc/include/shiftc/bcq_lut.h) for one layer shape at width b, measured on this
machine with the weights coming from memory (``cold_bytes``: as in a decode step, where the rest of
the model's weights pass through the caches between two uses of a layer). t_other: everything that
is not a quantized layer's kernel (attention, norms, embedding, the runtime); s: how much slower the
kernels run inside the compiled model than alone. Both are fitted on compiled plans
(:func:`measure_fixed_cost`: the uniform smallest- and largest-width plans, compiled and timed
alternating; :func:`fit_fixed_cost`), or given (``other_ms``, s = 1).

Each (N, K, b) is timed once on random packed weights: ``m`` rows of x (1 = decode, the
default), ``threads`` threads. Distinct shapes are few in a transformer (SmolLM2-135M: 5 shapes),
so this takes seconds.

Only the host can be measured: ``--target`` other than ``host`` is refused (no remote timing).
"""

from __future__ import annotations

import time

import numpy as np

from ...errors import UnsupportedError, UsageError


def kernel_available() -> bool:
    try:
        from ... import _native
    except ImportError:
        return False
    return hasattr(_native, "bcq_matmul_lut16") and hasattr(_native, "bcq_pack_lut16")


def require_kernel(target: str = "host") -> None:
    if target not in ("host", None):
        raise UnsupportedError(f"--latency-budget-ms with --target {target}: kernel times can only be measured on "
                               f"this machine (--target host) for now")
    if not kernel_available():
        raise UnsupportedError("--latency-budget-ms needs per-shape kernel timings from the LUT kernels "
                               "(shiftc._native.bcq_matmul_lut16), which this build of shiftc lacks; rebuild "
                               "shiftc with the LUT kernels or drop --latency-budget-ms (size-only plan)")


COLD_BYTES = 48e6  # weight bytes cycled through when timing a kernel "cold" (about SmolLM2-135M's at 2.5 bits)


def _packed(n: int, k: int, bits: int, group: int, copies: int, rng) -> list:
    from ... import _native

    words = -(-k // 32)
    out = []
    for _ in range(copies):
        planes = rng.integers(0, 2**32, (bits, n, words), dtype=np.uint64).astype(np.uint32)
        alpha = np.exp2(rng.integers(-8, -2, (bits, n, -(-k // group)))).astype(np.float32)
        out.append(_native.bcq_pack_lut16(planes, alpha, k, group, "pm1"))
    return out


def _copies(n: int, k: int, bits: int, group: int, cold_bytes: float) -> int:
    one = bits * n * ((-(-k // 32)) * 4 + 2 * -(-k // group))
    return 1 if cold_bytes <= 0 else int(min(256, max(1, -(-cold_bytes // one))))


def _one_pass(x, packed, n, k, bits, group, threads) -> float:
    from ... import _native

    t0 = time.perf_counter()
    for codes, scales, offsets in packed:
        _native.bcq_matmul_lut16(x, codes, scales, offsets, n, k, bits, group, threads)
    return (time.perf_counter() - t0) / len(packed)


def time_kernel(n: int, k: int, bits: int, group: int, *, m: int = 1, threads: int = 1, repeats: int = 20,
                seed: int = 0, cold_bytes: float = COLD_BYTES) -> float:
    """Seconds of one BcqMatMul [m, k] x [n, k]ᵀ at ``bits`` with the LUT kernel.

    In a decode step every layer's weights are read once, after the rest of the model's weights
    went through the caches: the kernel runs on weights that come from memory. So by default the
    kernel is timed *cold*: on enough distinct copies of the packed weights to make ``cold_bytes``
    in all (at most 256 copies), called in turn; the time per call of the fastest of ``repeats``
    passes. ``cold_bytes=0``: one copy (hot caches; 1.5-3x faster than cold on SmolLM2's shapes).
    On a shared machine the fastest pass excludes the time the process was preempted."""
    rng = np.random.default_rng(seed)
    packed = _packed(n, k, bits, group, _copies(n, k, bits, group, cold_bytes), rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    _one_pass(x, packed[:1], n, k, bits, group, threads)  # warm-up
    return float(min(_one_pass(x, packed, n, k, bits, group, threads) for _ in range(repeats)))


def layer_times(shapes: list[tuple[int, int]], widths: list[int], group: int, *, m: int = 1, threads: int = 1,
                repeats: int = 8, timer=None, target: str = "host", cold_bytes: float = COLD_BYTES,
                seed: int = 0) -> tuple[np.ndarray, dict]:
    """Milliseconds [layers, widths], one timing per distinct (N, K, width); and the table of
    distinct timings {"NxK": {bits: ms}}. The LUT kernels are timed cold (see :func:`time_kernel`),
    all (N, K, width) in turn, ``repeats`` rounds, the fastest pass of each: a change of the
    machine's load during the measurement hits every entry alike. ``timer(n, k, bits)`` -> seconds
    replaces the kernel (tests, or timings from elsewhere)."""
    if m < 1 or threads < 1:
        raise UsageError(f"latency model: m and threads must be >= 1 (got {m}, {threads})")
    keys = list(dict.fromkeys((int(n), int(k), int(b)) for n, k in shapes for b in widths))
    if timer is not None:
        per_shape = {key: 1e3 * float(timer(*key)) for key in keys}
    else:
        require_kernel(target)
        rng = np.random.default_rng(seed)
        packed = {key: _packed(*key, group, _copies(*key, group, cold_bytes), rng) for key in keys}
        xs = {key: rng.standard_normal((m, key[1])).astype(np.float32) for key in keys}
        best = {key: np.inf for key in keys}
        for key in keys:  # warm-up
            _one_pass(xs[key], packed[key][:1], *key, group, threads)
        for _ in range(repeats):
            for key in keys:
                best[key] = min(best[key], _one_pass(xs[key], packed[key], *key, group, threads))
        per_shape = {key: 1e3 * float(v) for key, v in best.items()}
        del packed
    t = np.array([[per_shape[(int(n), int(k), b)] for b in widths] for n, k in shapes])
    table = {f"{n}x{k}": {str(b): per_shape[(n, k, b)] for b in widths}
             for n, k in dict.fromkeys((n, k) for n, k, _ in per_shape)}
    return t, table


def times_from_table(shapes: list[tuple[int, int]], widths: list[int], per_shape: dict) -> np.ndarray:
    """Milliseconds [layers, widths] from a saved table {"NxK": {bits: ms}} (layer_times' second
    result); a missing shape or width raises UsageError."""
    try:
        return np.array([[float(per_shape[f"{int(n)}x{int(k)}"][str(b)]) for b in widths] for n, k in shapes])
    except KeyError as e:
        raise UsageError(f"latency table: no kernel time for {e.args[0]} (measure it with layer_times)") from None


def fit_fixed_cost(kernel_ms: list[float], measured_ms: list[float], *, fit_scale: bool = False) -> dict:
    """The model's decode time as t = t_other + s · Σ_i t_i(b_i), fitted on compiled plans: their
    summed kernel times (``kernel_ms``) and measured decode times (``measured_ms``).

    ``fit_scale`` False (default): s = 1 and t_other is the mean of (measured − kernel) — one
    compiled plan is enough; the spread over several plans is the model's error. True: least
    squares on ≥ 2 plans with different kernel sums (s > 1 when the kernels run slower inside the
    model than alone, e.g. weights not in cache). Returns {"other_ms", "scale", "residual_ms"}."""
    k = np.asarray(kernel_ms, np.float64)
    m = np.asarray(measured_ms, np.float64)
    if k.shape != m.shape or k.size == 0:
        raise UsageError("fit_fixed_cost: one kernel sum per measured plan, at least one plan")
    fallback = False
    if fit_scale:
        if k.size < 2 or np.ptp(k) <= 0:
            raise UsageError("fit_fixed_cost with fit_scale: needs two plans with different kernel times")
        s, other = np.polyfit(k, m, 1)
        # a small model's kernel differences can drown in timing noise: a fit without physical
        # meaning (kernels getting faster with more bits, or a negative fixed cost) falls back to s = 1
        if s <= 0 or other < 0:
            fit_scale, fallback = False, True
    if not fit_scale:
        s, other = 1.0, max(0.0, float(np.mean(m - k)))
    resid = m - (other + s * k)
    return {"other_ms": float(other), "scale": float(s), "residual_ms": [float(r) for r in resid],
            "scale_fallback": fallback}


def decode_ms(libs: dict[str, str], *, load, threads: int = 1, rounds: int = 20, past: int = 128,
              warmup: int = 2) -> dict[str, list[float]]:
    """Decode time (ms per token) of compiled causal-LM libraries, alternating between them
    (shiftc.timing.alternate): one token on a ``past``-token KV cache, the cache restored
    before every step, ``threads`` threads each; ``load(path, threads=)`` opens a library
    (shiftc.load)."""
    from ...timing import alternate

    sessions = {k: load(v, threads=threads).lm_session() for k, v in libs.items()}
    saved = {}
    prompt = np.random.default_rng(0).integers(0, 1000, (1, past))
    for k, s in sessions.items():
        s.reset()
        s.step(prompt, last_only=True)
        saved[k] = (list(s.past), s.length)

    def decode(name):
        s = sessions[name]
        s.past, s.length = list(saved[name][0]), saved[name][1]
        s.step(np.array([[42]]), last_only=True)

    times = alternate({k: (lambda k=k: decode(k)) for k in sessions}, rounds, warmup=warmup)
    return {k: [1e3 * t for t in v] for k, v in times.items()}


def compile_plan(model, results: dict, sa_cfg, so: str, compile_model) -> str:
    """The shift-add pass with per-layer ``results`` {layer: BcqResult}, compiled for the host into
    ``so`` by ``compile_model(onnx_path, so)`` (shiftc.compile)."""
    import os

    from ...frontend.onnx_io import save_model
    from ..shiftadd import ShiftAddPass

    path = os.path.splitext(so)[0] + ".onnx"
    save_model(ShiftAddPass(sa_cfg)(model, results=results).model, path)
    try:
        compile_model(path, so)
    finally:
        os.remove(path)
    return so


def measure_fixed_cost(model, plans: dict[str, tuple[dict, float]], sa_cfg, tools, *, threads: int = 1,
                       rounds: int = 10, workdir: str | None = None, keep: str | None = None) -> dict:
    """Calibrate the latency model on compiled plans: ``plans`` {name: (results {layer: BcqResult},
    Σ kernel ms of that plan)} — e.g. every layer at the smallest and at the largest width, results
    the sensitivity step has computed anyway — are compressed, compiled for the host and their
    decode times measured, alternating; then :func:`fit_fixed_cost` (with the scale when two plans).
    Returns the fit plus {"measured_ms", "kernel_ms"} per plan; with ``keep`` (a folder) the
    libraries stay there, {"libs": {name: path}} (the closed loop times them again). ``tools``:
    shiftc.passes.tools.Tools with compile and load."""
    import os
    import tempfile

    why = "--latency-budget-ms (compiled plans)"
    compile_model, load = tools.need("compile", why), tools.need("load", why)
    with tempfile.TemporaryDirectory(prefix="shiftc_latency_", dir=workdir) as d:
        libs = {name: compile_plan(model, results, sa_cfg, os.path.join(keep or d, f"{name}.so"), compile_model)
                for name, (results, _) in plans.items()}
        ms = decode_ms(libs, load=load, threads=threads, rounds=rounds)
    names = list(plans)
    med = {k: float(np.median(ms[k])) for k in names}
    kern = {k: float(plans[k][1]) for k in names}
    fit = fit_fixed_cost([kern[k] for k in names], [med[k] for k in names], fit_scale=len(names) > 1)
    return {**fit, "measured_ms": med, "kernel_ms": kern, "rounds": rounds, "threads": threads,
            **({"libs": libs} if keep else {})}


def close_loop(plan: dict, replan, build, time_libs, kernel_sum, calib: dict[str, tuple[str, float]], *,
               iterations: int) -> dict:
    """The closed loop of ``--latency-budget-ms``: a plan counts as meeting its budget once its
    *compiled* model measures within it, not when the latency model predicts so.

    Each iteration compiles the plan (``build(layer_bits)`` -> library path), times it alternating
    with the calibration libraries ``calib`` {name: (library, Σ kernel ms)} (``time_libs({name:
    path})`` -> {name: median ms}: the same process, the same minutes, so a machine that has become
    slower since the calibration slows all of them alike). Accepted when the plan measures at or
    under ``plan["latency"]["planned_ms"]`` (the budget less the margin). Otherwise the latency
    model is fitted again on what was just measured — the calibration plans and this plan,
    :func:`fit_fixed_cost` with the scale when the kernel sums differ — and ``replan(fixed)`` makes
    the plan again (raising UsageError when even the fastest plan is now predicted over the
    budget). Stops after ``iterations`` measured plans, or when the refitted model gives a plan
    already measured. ``kernel_sum(layer_bits)``: Σ kernel ms of a plan, unscaled.

    Returns the last measured plan with ``plan["latency"]["verify"]`` {"accepted", "iterations":
    [{"predicted_ms", "measured_ms", "calibration_ms", "avg_bits", ...}]}."""
    if iterations < 1:
        raise UsageError(f"--latency-verify: at least one iteration, got {iterations}")
    history, built = [], {}
    accepted = False
    while True:
        lt = plan["latency"]
        key = tuple(plan["layer_bits"].values())
        if key not in built:
            built[key] = build(plan["layer_bits"])
        ms = time_libs({**{n: lib for n, (lib, _) in calib.items()}, "plan": built[key]})
        k_plan = float(kernel_sum(plan["layer_bits"]))
        accepted = ms["plan"] <= lt["planned_ms"]
        history.append({"predicted_ms": lt["predicted_ms"], "planned_ms": lt["planned_ms"], "measured_ms": ms["plan"],
                        "kernel_ms": k_plan, "avg_bits": plan["avg_bits"],
                        "calibration_ms": {n: ms[n] for n in calib}, "accepted": accepted})
        if accepted or len(history) >= iterations:
            break
        names = list(calib)
        kern = [float(calib[n][1]) for n in names] + [k_plan]
        meas = [ms[n] for n in names] + [ms["plan"]]
        fixed = {**fit_fixed_cost(kern, meas, fit_scale=np.ptp(kern) > 0),
                 "measured_ms": dict(zip(names + ["plan"], meas)), "kernel_ms": dict(zip(names + ["plan"], kern)),
                 "refit": len(history)}
        try:
            new = replan(fixed)
        except UsageError as e:
            raise UsageError(f"{e}, by the latency model refitted on the compiled plans measured just now (the plan "
                             f"made before measured {ms['plan']:.2f} ms/token against {lt['planned_ms']:.2f} "
                             f"planned)") from None
        if tuple(new["layer_bits"].values()) in built:
            history[-1]["stop"] = "the refitted latency model gives a plan already measured"
            break
        plan = new
    plan["latency"]["verify"] = {"accepted": accepted, "iterations": history}
    return plan
