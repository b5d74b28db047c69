"""Binarization (FDB, DB-LLM's flexible dual binarization) next to shift-add and RTN at 2 bits.

Accuracy — SmolLM2-135M perplexity with ONNX Runtime (shiftc.evaluate: non-overlapping windows of
the held-out Wikipedia split, each from an empty cache), one calibration (H = XᵀX, 16 x 256 tokens
of the calib split) shared by the GPTQ-compensated methods, same group G for all:
  fp32                 the exported model
  fdb 2-bit            shiftc's binarize pass (FdbMatMul: 2 {0,1} planes, float16 α1, α2, μ / group)
  fdb 1bit             the same pass in 1-bit mode (one sign plane, float16 scale and mean / group)
  shiftadd 2-bit       shiftc's shift-add pass (BcqMatMul: 2 ±1 planes, scales 2^e or 2^e1 + 2^e2: its default)
  rtn 2-bit            round-to-nearest, uniform asymmetric per group (fp32 scale, 2-bit zero)
All on the same 211 layers (incl. the tied LM head). Compressed models are evaluated on a copy with
Ŵ reconstructed as fp32 weights (the same numbers as the ops' function bodies; ONNX Runtime
inlining 211 function bodies needs more memory than this machine has free).

Speed — GEMV 1 x 4096 x 4096 with the lut16 kernels (shiftc._native.bcq_matmul_lut16, 1 thread),
FDB 2-bit (coding "01", per-group offsets: the arrays FdbMatMul's lowering builds) and shift-add
2-bit (pm1, no offsets) alternated in one run (shiftc.timing.alternate); medians.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fdb.py --tokens 8192 --work out/bench/fdb \
        --out benchmarks/results/fdb.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from common import read_results, work_dir, write_results


def gemv_speed(repeats: int, group: int, n: int = 4096, k: int = 4096) -> dict:
    """Median seconds of FDB 2-bit vs shift-add 2-bit GEMV (1 thread, alternated)."""
    from shiftc import _native as nat
    from shiftc.backend.shiftc_ops import fdb_lut16
    from shiftc.timing import alternate
    from shiftc.passes import bcq

    rng = np.random.default_rng(0)
    ng = -(-k // group)
    planes = bcq.pack_planes(rng.integers(0, 2, (2, n, k), dtype=np.uint8))
    x = rng.standard_normal((1, k)).astype(np.float32)
    scales = (rng.standard_normal((2, n, ng)) * 0.02).astype(np.float16)
    offsets = (rng.standard_normal((n, ng)) * 0.01).astype(np.float16)
    f_codes, f_scales, f_off = fdb_lut16(planes, scales, offsets, k, group)
    exps = rng.integers(-9, -4, (2, n, ng, 1)).astype(np.int8)
    s_codes, s_scales, s_off = nat.bcq_pack_lut16(planes, bcq.exps_to_alpha(exps), k, group, "pm1")
    fns = {"fdb 2-bit": lambda: nat.bcq_matmul_lut16(x, f_codes, f_scales, f_off, n, k, 2, group, threads=1),
           "shiftadd 2-bit": lambda: nat.bcq_matmul_lut16(x, s_codes, s_scales, s_off, n, k, 2, group, threads=1)}
    times = alternate(fns, repeats, warmup=3, gap_s=0.01)
    med = {key: statistics.median(v) for key, v in times.items()}
    return {"shape": [1, k, n], "group": group, "threads": 1, "repeats": repeats, "isa": nat.bcq_isa(),
            "median_ms": {key: v * 1e3 for key, v in med.items()},
            "fdb_over_shiftadd": med["fdb 2-bit"] / med["shiftadd 2-bit"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported SmolLM2 .onnx (default: export it into --work)")
    p.add_argument("--work", default=None, help="folder for the models (default: out/bench/fdb)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--methods", default="fdb,shiftadd,rtn,1bit", help="comma list of fdb, 1bit, shiftadd, rtn")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--calib-window", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true", help="reuse compressed models found in --work")
    p.add_argument("--gemv-repeats", type=int, default=200)
    p.add_argument("--fp32-ppl", type=float, help="fp32 perplexity from an earlier run (not measured again)")
    p.add_argument("--append", action="store_true", help="keep the rows (and GEMV) already in --out; add these")
    p.add_argument("--skip-gemv", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--out", default="benchmarks/results/fdb.json")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    result = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", "tokens": a.tokens, "window": a.window,
              "corpus": "wikipedia/eval", "group": a.group, "threads": a.threads,
              "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fdb.py " + " ".join(argv or sys.argv[1:])}
    old = {}
    if a.append and os.path.exists(a.out):  # several invocations (memory: one method at a time) -> one file
        old = read_results(a.out)
        result["commands"] = old.get("commands", [old.get("command")]) + [result["command"]]
        if "gemv" in old:
            result["gemv"] = old["gemv"]

    def save():
        write_results(a.out, result)

    if not a.skip_gemv:
        result["gemv"] = gemv_speed(a.gemv_repeats, a.group)
    g = result.get("gemv")
    if g:
        print(f"GEMV 1x4096x4096 G{a.group}, 1 thread, {g['isa']}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in g["median_ms"].items())
          + f"  -> fdb / shiftadd = {g['fdb_over_shiftadd']:.3f}", flush=True)
    save()
    if a.skip_accuracy:
        return 0

    import shiftc
    import shiftc.api
    from bench_shiftadd_accuracy import dequantized_model
    from shiftc.passes.ops import dequantized_copy as sa_dequantized
    from shiftc.frontend.data import smollm2_gguf
    from shiftc.frontend.onnx_io import load_model, save_model
    from shiftc.passes import bcq, fdb
    from shiftc.passes.binarize import BinarizeConfig, BinarizePass, dequantized_copy
    from shiftc.passes.calibration import calibration_windows, collect_hessians
    from shiftc.passes.shiftadd import ShiftAddConfig, ShiftAddPass

    work = a.work or work_dir("fdb")
    os.makedirs(work, exist_ok=True)
    src = a.model or os.path.join(work, "smol.onnx")
    if not os.path.exists(src):
        shiftc.export(str(smollm2_gguf()), src, max_positions=1024)
    model = load_model(src)
    rows, timings = list(old.get("rows", [])), dict(old.get("timings_s", {}))
    result.update(rows=rows, timings_s=timings)

    def add(name, path, bpw, note=""):
        t0 = time.perf_counter()
        v = shiftc.api.evaluate(path, tokens=a.tokens, window=a.window, threads=a.threads)["perplexity"]
        rows.append({"method": name, "perplexity": v, "bits_per_weight": round(bpw, 4), "note": note})
        timings[f"ppl {name}"] = round(time.perf_counter() - t0, 1)
        save()
        print(f"  {name}: ppl {v:.3f} ({bpw:.3f} bits/weight)", file=sys.stderr, flush=True)

    if a.fp32_ppl is not None:
        rows.append({"method": "fp32", "perplexity": a.fp32_ppl, "bits_per_weight": 32.0, "note": "from an earlier run"})
    elif not any(r["method"] == "fp32" for r in rows):
        add("fp32", src, 32.0)
    methods = [m for m in a.methods.split(",") if m]
    targets, _ = BinarizePass().match(model)
    cache = {}

    def hessians():  # computed on first need (a reused model needs none)
        if "hs" not in cache:
            t0 = time.perf_counter()
            ids = calibration_windows(model, windows=a.calib_windows, window=a.calib_window, model_path=src)
            cache["hs"] = collect_hessians(model, [t.x for t in targets], ids, threads=a.threads)
            timings["calibration"] = round(time.perf_counter() - t0, 1)
        return cache["hs"]
    calib = f"GPTQ, calib {a.calib_windows}x{a.calib_window}"
    for m in methods:
        if m in ("fdb", "1bit"):
            path = os.path.join(work, f"smol_{m}_g{a.group}.onnx")
            if not (a.reuse and os.path.exists(path)):
                t0 = time.perf_counter()
                res = BinarizePass(BinarizeConfig(mode=m, group=a.group))(model, hessians())
                timings[f"binarize {m}"] = round(time.perf_counter() - t0, 1)
                save_model(res.model, path)
                del res
            comp = load_model(path)
            meta = json.loads({q.key: q.value for q in comp.metadata_props}["shiftc.compression"])
            deq = os.path.join(work, f"smol_{m}_g{a.group}_deq.onnx")
            save_model(dequantized_copy(comp), deq)
            del comp
            label = "fdb 2-bit" if m == "fdb" else "fdb 1bit"
            add(f"{label} G{a.group}", deq, meta["bits_per_weight"], f"{calib}; float16 scales + offset")
        elif m == "shiftadd":
            path = os.path.join(work, f"smol_sa2_g{a.group}.onnx")
            if not (a.reuse and os.path.exists(path)):
                t0 = time.perf_counter()
                res = ShiftAddPass(ShiftAddConfig(bits=2, group=a.group))(model, hessians())
                timings["shiftadd 2-bit"] = round(time.perf_counter() - t0, 1)
                save_model(res.model, path)
                del res
            comp = load_model(path)
            meta = json.loads({q.key: q.value for q in comp.metadata_props}["shiftc.compression"])
            deq = os.path.join(work, f"smol_sa2_g{a.group}_deq.onnx")
            save_model(sa_dequantized(comp), deq)
            del comp
            add(f"shiftadd 2-bit G{a.group} {meta['scale_mode']}", deq, meta["bits_per_weight"], f"{calib}; int8 exponents")
        elif m == "rtn":
            path = os.path.join(work, f"smol_rtn2_g{a.group}.onnx")
            save_model(dequantized_model(model, targets, lambda t, w: bcq.quantize_rtn(w, 2, a.group)), path)
            add(f"rtn 2-bit G{a.group}", path, bcq.bits_per_weight(2, a.group, method="rtn"), "no calibration")
        else:
            raise SystemExit(f"--methods: unknown method {m!r}")
    save()
    fp = next(r["perplexity"] for r in rows if r["method"] == "fp32")
    print(f"SmolLM2-135M perplexity, wikipedia/eval, {a.tokens} tokens, window {a.window}, ONNX Runtime")
    print(f"{'method':32} {'ppl':>12} {'x fp32':>10} {'bits/w':>7}")
    for r in rows:
        print(f"{r['method']:32} {r['perplexity']:12.3f} {r['perplexity'] / fp:10.3f} {r['bits_per_weight']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
