"""SmolLM2-135M end to end: shift-add compiled libraries vs fp32 and ONNX Runtime's 4-bit, side by side.

Contestants (same thread count, runs interleaved round by round with shiftc.timing.alternate):
  ort-fp32          ONNX Runtime on the exported fp32 model
  ort-nbits4        ONNX Runtime on its own MatMulNBits 4-bit model (block 32 by default:
                    onnxruntime.quantization.matmul_nbits_quantizer, symmetric; the tied LM head
                    stays fp32 there because its weight is not an initializer of the MatMul)
  shiftc-fp32       shiftc's compiled fp32 library
  shiftc-sa<q>      shiftc's compiled library of the shift-add q-bit model (BcqMatMul run by the
                    LUT kernels of csrc/kernels/bcq_lut.cc)
Cases: decode (one token on a 128-token KV cache; the cache is restored before every step) and
prefill (128 tokens). Reported: median ms, tokens/s and ratio = other / shiftc-sa<q>.

Speed does not depend on the weights' values, so ``--sa`` may be a model quantized without
calibration; the accuracy benchmark (bench_shiftadd_accuracy.py) measures perplexity.

    python benchmarks/bench_shiftadd_e2e.py --fp32 out/bench/smol/smol.onnx --sa 3=out/bench/sa/smol_sa3.onnx \
        [--threads 1 2] [--json benchmarks/results/shiftadd_e2e.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from common import work_dir, write_results
from shiftc.timing import alternate

HERE = os.path.dirname(os.path.abspath(__file__))


def nbits_model(fp32: str, out: str, bits: int = 4, block: int = 32) -> str:
    """ONNX Runtime's own weight-only quantizer (MatMulNBits); cached at ``out``."""
    if os.path.exists(out):
        return out
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(fp32)
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True)
    q.process()
    onnx.save(q.model.model, out + ".tmp", save_as_external_data=False)
    os.replace(out + ".tmp", out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", required=True, help="exported SmolLM2 fp32 ONNX")
    ap.add_argument("--sa", action="append", default=[], metavar="Q=PATH", help="shift-add model at Q bits")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--workdir", default=work_dir("sa_e2e"))
    ap.add_argument("--json", default=os.path.join(HERE, "results", "shiftadd_e2e.json"))
    args = ap.parse_args(argv)

    from shiftc.backend.compile import compile_model
    from shiftc.backend.runtime import load

    os.makedirs(args.workdir, exist_ok=True)
    libs, info = {}, {"compile_s": {}}
    sa = {}
    for spec in args.sa:
        q, path = spec.split("=", 1)
        sa[f"shiftc-sa{q}"] = path
    for name, path in [("shiftc-fp32", args.fp32), *sa.items()]:
        so = os.path.join(args.workdir, name + ".so")
        if not os.path.exists(so) or os.path.getmtime(so) < os.path.getmtime(path):
            t0 = time.perf_counter()
            compile_model(path, so)
            info["compile_s"][name] = round(time.perf_counter() - t0, 1)
        libs[name] = so
    nb4 = nbits_model(args.fp32, os.path.join(args.workdir, "smol_nbits4_b32.onnx"))
    info["sizes_mb"] = {k: round(os.path.getsize(v) / 1e6, 1) for k, v in
                        {"ort-fp32": args.fp32, "ort-nbits4": nb4, **libs}.items()}

    rows = []
    prompt = np.random.default_rng(0).integers(0, 49152, (1, 128))
    for threads in args.threads:
        models = {"ort-fp32": load(args.fp32, threads=threads), "ort-nbits4": load(nb4, threads=threads),
                  **{k: load(v, threads=threads) for k, v in libs.items()}}
        sessions = {k: m.lm_session() for k, m in models.items()}

        def prefill(name):
            s = sessions[name]
            s.reset()
            s.step(prompt, last_only=True)

        pre = alternate({k: (lambda k=k: prefill(k)) for k in sessions}, max(3, args.rounds // 4), warmup=1)
        saved = {k: (list(s.past), s.length) for k, s in sessions.items()}

        def decode(name):
            s = sessions[name]
            s.past, s.length = list(saved[name][0]), saved[name][1]
            s.step(np.array([[42]]), last_only=True)

        dec = alternate({k: (lambda k=k: decode(k)) for k in sessions}, args.rounds, warmup=2)
        for case, times, ntok in (("decode (past 128)", dec, 1), ("prefill (128)", pre, 128)):
            med = {k: float(np.median(v)) for k, v in times.items()}
            for ref in sa or ["shiftc-fp32"]:
                rows.append({"case": case, "threads": threads, "vs": ref,
                             "ms": {k: round(v * 1e3, 3) for k, v in med.items()},
                             "tokens_per_s": {k: round(ntok / v, 1) for k, v in med.items()},
                             "ratio_other_over_shiftc": {k: round(v / med[ref], 2) for k, v in med.items() if k != ref}})

    for r in rows:
        print(f"\n{r['case']}, {r['threads']} thread(s), ratios vs {r['vs']}")
        for k in r["ms"]:
            ratio = r["ratio_other_over_shiftc"].get(k, 1.0)
            print(f"  {k:14s} {r['ms'][k]:9.2f} ms  {r['tokens_per_s'][k]:9.1f} tok/s   x{ratio:.2f}")
    out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "rows": rows, **info}
    write_results(args.json, out)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
