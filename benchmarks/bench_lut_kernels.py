"""lut16 kernels of ai.shiftc::BcqMatMul next to ONNX Runtime's fp32 MatMul and MatMulNBits.

Y = X W^T with X [M, K], W [N, K], at the same thread count (default 1; ONNX Runtime sessions get
intra_op_num_threads = threads), in ONE process with the calls alternating round by round
(shiftc.timing.alternate) so that load from elsewhere on the machine hits all alike.

    shiftc-qB     shiftc._native.bcq_matmul_lut16 at B = 2, 3, 4 bits, G = 128, pm1 planes,
                  power-of-two scales (tables for M < BCQ_LUT_MAX_M, expanded panels otherwise),
                  with the kernels' automatic ISA choice (on a CPU with AMX-BF16 the GEMM shapes
                  run the AMX path, bf16 parts in tiles); the time includes prepare (tables) and the
                  workspace allocation
    shiftc-fma-qB GEMM shapes on a CPU with AMX only: the same call with the ISA forced to
                  "avx512" (the AVX-512 FMA GEMM), in the same alternating rounds
    ort-fp32      MatMul with a constant fp32 weight (MLAS; prepacked at session creation)
    ort-nbitsB    com.microsoft MatMulNBits, B bits, block 128, symmetric, from onnxruntime's
                  MatMulNBitsQuantizer, accuracy_level 0 (fp32 math: the default) and, as
                  "ort-nbitsB-int8", accuracy_level 4 (activations quantized to int8 per block)
A width ONNX Runtime refuses is reported as refused with its message (the quantizer accepts 2, 4
and 8 bits; a hand-written bits=3 node is tried as well). An implementation whose single call
takes over a second (MatMulNBits 2-bit at accuracy level 0 falls back to a slow path) is timed
once and listed as such.

Each timed sample repeats a call for about 5 ms and counts the mean (a lone sub-millisecond call
after alternate's pause would mostly time a waking core and cold caches). Prints, per shape, each
implementation's median and best time per call and its ratio other / shiftc-qB (> 1: the shiftc
kernel is faster), the median over rounds of the ratio within a round (on a machine shared with
other work, calls of one round see nearly the same load) -- of wall time, and in brackets of
process CPU time, which time-slicing by other processes does not inflate -- checks the acceptance
targets and writes the JSON.

    python benchmarks/bench_lut_kernels.py [--threads 1] [--rounds 20] [--only gemv|gemm|smollm2]
                                           [--json benchmarks/results/lut_kernels.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import time

import numpy as np

from common import write_results
from shiftc import _native as nat
from shiftc.timing import alternate
from shiftc.passes.bcq import pack_planes

HERE = os.path.dirname(os.path.abspath(__file__))

GROUP = 128
SLOW_S = 1.0  # an implementation whose single call takes longer is timed once (see bench_shape)
SAMPLE_S = 0.005  # a timed sample repeats a call this long (see bench_shape)
SHIFTC_BITS = (2, 3, 4)
NBITS = (4, 3, 2)
# (name, M, K, N, timed rounds relative to --rounds)
SHAPES = [
    ("gemv", 1, 4096, 4096, 1.0),
    ("gemm", 128, 4096, 4096, 0.75),
    ("gemm", 512, 4096, 4096, 0.3),
    ("smollm2", 1, 576, 1536, 1.0),
    ("smollm2", 1, 1536, 576, 1.0),
    ("smollm2", 1, 576, 49152, 0.5),
]
# acceptance targets at 1 thread: (shape, shiftc bits, other, minimum other/shiftc)
TARGETS = [
    ((1, 4096, 4096), 2, "ort-fp32", 5.0),
    ((1, 4096, 4096), 2, "ort-nbits4", 2.5),
    ((1, 4096, 4096), 3, "ort-fp32", 3.5),
    ((128, 4096, 4096), 3, "ort-fp32", 1.0),
]


def _session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 4  # a refused node raises; no console log as well
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _fp32_model(w_kn: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    K, N = w_kn.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
        [numpy_helper.from_array(w_kn, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _nbits_model(w_kn: np.ndarray, bits: int, accuracy_level: int):
    """MatMulNBits from the quantizer; for a width it refuses, the node written by hand (random
    codes: only the speed matters), which ONNX Runtime may still refuse at session creation."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    K, N = w_kn.shape
    if bits in (2, 4, 8):
        quant = MatMulNBitsQuantizer(_fp32_model(w_kn), bits=bits, block_size=GROUP, is_symmetric=True,
                                     accuracy_level=accuracy_level)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quant.process()
        return quant.model.model
    rng = np.random.default_rng(bits)
    nb = -(-K // GROUP)
    blob = GROUP * bits // 8
    b = rng.integers(0, 256, (N, nb, blob), dtype=np.uint8)
    scales = (rng.random(N * nb, dtype=np.float32) + 0.5) / 64
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=GROUP, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "nbits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
        [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model


def _shiftc_fn(x, w_bits, q: int, K: int, N: int, threads: int, isa: str | None = None):
    """The lut16 matmul; with ``isa``, forced to that ISA for the call (the automatic one after)."""
    rng = np.random.default_rng(q)
    planes = pack_planes(w_bits[:q])
    alpha = np.exp2(rng.integers(-9, -3, (q, N, -(-K // GROUP)))).astype(np.float32)
    codes, scales, offsets = nat.bcq_pack_lut16(planes, alpha, K, GROUP, "pm1")
    if isa is None:
        return lambda: nat.bcq_matmul_lut16(x, codes, scales, offsets, N, K, q, GROUP, threads=threads)

    def forced():
        nat.bcq_set_isa(isa)
        try:
            return nat.bcq_matmul_lut16(x, codes, scales, offsets, N, K, q, GROUP, threads=threads)
        finally:
            nat.bcq_set_isa("auto")

    return forced


def _amx_gemm(M: int) -> bool:
    """Whether the automatic ISA runs this M on the AMX GEMM."""
    return nat.bcq_isa() == "amx" and M >= nat.BCQ_AMX_MIN_M


def bench_shape(M: int, K: int, N: int, threads: int, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    w_bits = rng.integers(0, 2, (max(SHIFTC_BITS), N, K), dtype=np.uint8)
    fns, refused, slow = {}, {}, {}
    for q in SHIFTC_BITS:
        fns[f"shiftc-q{q}"] = _shiftc_fn(x, w_bits, q, K, N, threads)
    if _amx_gemm(M):
        for q in SHIFTC_BITS:
            fns[f"shiftc-fma-q{q}"] = _shiftc_fn(x, w_bits, q, K, N, threads, isa="avx512")
    sess = _session(_fp32_model(w), threads)
    fns["ort-fp32"] = lambda s=sess: s.run(None, {"x": x})
    for bits in NBITS:
        for level, suffix in ((0, ""), (4, "-int8")):
            name = f"ort-nbits{bits}{suffix}"
            try:
                s = _session(_nbits_model(w, bits, level), threads)
                s.run(None, {"x": x})
            except Exception as e:  # noqa: BLE001  (any refusal is reported, not fatal)
                msg = str(e).split("was false.")[-1].strip() or str(e)
                refused[name] = f"{type(e).__name__}: {msg.splitlines()[0][:120]}"
                continue
            t0 = time.perf_counter()
            s.run(None, {"x": x})
            single = time.perf_counter() - t0
            if single > SLOW_S:  # a fallback path, far off the others: timed once, not alternated
                slow[name] = single * 1e3
                continue
            fns[name] = lambda s=s: s.run(None, {"x": x})
    # a timed sample repeats the call `inner` times back to back (so that it lasts about SAMPLE_S)
    # and counts their mean: a single sub-millisecond call right after alternate's pause would
    # mostly measure the wake-up of an idle core and cold caches, alike for every implementation
    inner = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, round(SAMPLE_S / max(time.perf_counter() - t0, 1e-6)))
    cpu = {name: [] for name in fns}  # process CPU time of each sample, beside alternate's wall time

    def sample(name, fn, n):
        c0 = time.process_time()
        for _ in range(n):
            fn()
        cpu[name].append((time.process_time() - c0) / n)

    timed = {name: (lambda name=name, fn=fn: sample(name, fn, inner[name])) for name, fn in fns.items()}
    raw = alternate(timed, rounds, warmup=1)
    times = {k: [t / inner[k] for t in v] for k, v in raw.items()}
    cpu = {k: v[-rounds:] for k, v in cpu.items()}  # drop the warm-up sample
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    best = {k: min(v) * 1e3 for k, v in times.items()}
    cpu_med = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}

    # ratio: median over rounds of other / shiftc within the round (calls minutes apart would see
    # different loads on a shared machine; calls of one round see nearly the same)
    def ratio(t, other, q):
        return statistics.median(a / b for a, b in zip(t[other], t[f"shiftc-q{q}"]))

    ratios = {f"{o}/shiftc-q{q}": ratio(times, o, q) for q in SHIFTC_BITS for o in med if not o.startswith("shiftc")}
    cpu_ratios = {f"{o}/shiftc-q{q}": ratio(cpu, o, q) for q in SHIFTC_BITS for o in med if not o.startswith("shiftc")}
    for q in SHIFTC_BITS:  # the FMA GEMM against ONNX Runtime fp32, and the AMX GEMM against it
        fma = f"shiftc-fma-q{q}"
        if fma in med:
            for t, out in ((times, ratios), (cpu, cpu_ratios)):
                out[f"ort-fp32/{fma}"] = statistics.median(a / b for a, b in zip(t["ort-fp32"], t[fma]))
                out[f"{fma}/shiftc-q{q}"] = ratio(t, fma, q)
    for name, ms in slow.items():
        ratios.update({f"{name}/shiftc-q{q}": ms / med[f"shiftc-q{q}"] for q in SHIFTC_BITS})
    return {"M": M, "K": K, "N": N, "median_ms": med, "min_ms": best, "cpu_median_ms": cpu_med,
            "single_call_ms": slow, "ratios": ratios, "cpu_ratios": cpu_ratios, "refused": refused, "rounds": rounds,
            "calls_per_sample": inner}


def print_shape(r: dict) -> None:
    print(f"\nM={r['M']} K={r['K']} N={r['N']}   ({r['rounds']} alternating rounds; ratio = median over rounds of "
          "other / shiftc-qB, > 1: shiftc faster; wall time, and in [] process CPU time)")
    print(f"  {'implementation':<18}{'median ms':>10}{'min ms':>9}{'cpu ms':>9}" +
          "".join(f"{'/q' + str(q):>14}" for q in SHIFTC_BITS))
    for name, ms in r["median_ms"].items():
        cols = ""
        if name.startswith("shiftc-fma-q"):  # its own q column: ort-fp32 / this, and this / shiftc-qB
            q = int(name[len("shiftc-fma-q"):])
            cols = "".join(" " * 14 for _ in SHIFTC_BITS[:SHIFTC_BITS.index(q)])
            cols += (f"{r['ratios'][f'ort-fp32/{name}']:>7.2f} [{r['cpu_ratios'][f'ort-fp32/{name}']:>4.2f}]"
                     f"  (ort-fp32/this; this/shiftc-q{q}: {r['ratios'][f'{name}/shiftc-q{q}']:.2f})")
        elif not name.startswith("shiftc"):
            cols = "".join(f"{r['ratios'][f'{name}/shiftc-q{q}']:>7.2f} [{r['cpu_ratios'][f'{name}/shiftc-q{q}']:>4.2f}]"
                           for q in SHIFTC_BITS)
        print(f"  {name:<18}{ms:>10.3f}{r['min_ms'][name]:>9.3f}{r['cpu_median_ms'][name]:>9.3f}{cols}")
    for name, ms in r["single_call_ms"].items():
        cols = "".join(f"{r['ratios'][f'{name}/shiftc-q{q}']:>7.2f}       " for q in SHIFTC_BITS)
        print(f"  {name:<18}{ms:>10.3f}{'(1 call)':>18}{cols}")
    for name, why in r["refused"].items():
        print(f"  {name:<18}  refused by ONNX Runtime: {why}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=20, help="alternating rounds for the GEMV shapes")
    ap.add_argument("--only", choices=sorted({s[0] for s in SHAPES}), help="run one shape family")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "lut_kernels.json"))
    args = ap.parse_args()
    import onnxruntime as ort

    results = []
    for family, M, K, N, frac in SHAPES:
        if args.only and family != args.only:
            continue
        results.append(bench_shape(M, K, N, args.threads, max(3, int(args.rounds * frac))))
        print_shape(results[-1])
    checks = []
    if args.threads == 1:
        for shape, q, other, need in TARGETS:
            r = next((r for r in results if (r["M"], r["K"], r["N"]) == shape), None)
            if r is None or other not in r["median_ms"]:
                continue
            got = r["ratios"][f"{other}/shiftc-q{q}"]
            got_cpu = r["cpu_ratios"][f"{other}/shiftc-q{q}"]
            checks.append({"shape": list(shape), "bits": q, "vs": other, "target": need, "ratio": got,
                           "cpu_ratio": got_cpu, "met": got >= need})
        print("\nacceptance targets (1 thread; judged on wall time):")
        for c in checks:
            print(f"  {'x'.join(map(str, c['shape']))} shiftc-q{c['bits']} vs {c['vs']}: {c['ratio']:.2f}x "
                  f"[cpu {c['cpu_ratio']:.2f}x] (target >= {c['target']}x) {'met' if c['met'] else 'NOT met'}")
    out = {
        "what": "shiftc lut16 BcqMatMul kernels vs ONNX Runtime fp32 MatMul and MatMulNBits, alternating runs",
        "threads": args.threads, "group": GROUP, "isa": nat.bcq_isa(), "lut_max_m": nat.BCQ_LUT_MAX_M,
        "onnxruntime": ort.__version__, "cpu": _cpu_name(), "load_average": os.getloadavg(),
        "results": results, "targets": checks,
    }
    if args.only is None:
        write_results(args.json, out)
        print(f"\nwrote {args.json}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
