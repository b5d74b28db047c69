"""``make demo``: the main job on the embedded default model, SmolLM2-135M-Instruct.

export (GGUF -> ONNX with KV cache) -> compile (host CPU) -> evaluate perplexity with ONNX Runtime
and with the compiled library on the same held-out Wikipedia tokens -> decode/prefill speed of
both -> generate a short answer. Prints a final table and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import api
from .frontend.data import smollm2_gguf
from .progress import log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m shiftc.demo")
    p.add_argument("--workdir", default="out/demo")
    p.add_argument("--tokens", type=int, default=int(os.environ.get("SHIFTC_DEMO_TOKENS", 8192)))
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    onnx_path = os.path.join(args.workdir, "smollm2-135m.onnx")
    lib_path = os.path.join(args.workdir, "smollm2-135m.so")
    gguf = str(smollm2_gguf())
    timings = {}

    t0 = time.perf_counter()
    if not os.path.exists(onnx_path):
        api.export(gguf, onnx_path, max_positions=2048)
    timings["export_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not os.path.exists(lib_path) or os.path.getmtime(lib_path) < os.path.getmtime(onnx_path):
        api.compile(onnx_path, lib_path, target="host")
    timings["compile_s"] = time.perf_counter() - t0

    evals = {}
    for name, path in (("onnxruntime", onnx_path), ("compiled", lib_path)):
        log(f"perplexity with {name} on {args.tokens} held-out tokens")
        evals[name] = api.evaluate(path, tokens=args.tokens, window=args.window, threads=args.threads)
    threads = args.threads or os.cpu_count() or 1
    speed = api.bench(lib_path, reference=onnx_path, threads=threads, repeats=3, prefill=128, decode=16)
    log("generating")
    gen = api.load(lib_path, threads=args.threads).generate(
        "What is the capital of France?", chat=True, max_new_tokens=args.max_new_tokens, greedy=True)

    ppl_o, ppl_c = evals["onnxruntime"]["perplexity"], evals["compiled"]["perplexity"]
    rows = [
        ("", "ONNX Runtime", "shiftc compiled"),
        ("perplexity (wikipedia eval)", f"{ppl_o:.3f}", f"{ppl_c:.3f}"),
        ("  tokens scored", str(evals["onnxruntime"]["tokens_scored"]), str(evals["compiled"]["tokens_scored"])),
        (f"prefill t/s ({threads} threads)", f"{speed['prefill']['onnxruntime_tokens_per_s']:.1f}", f"{speed['prefill']['compiled_tokens_per_s']:.1f}"),
        (f"decode t/s ({threads} threads)", f"{speed['decode']['onnxruntime_tokens_per_s']:.1f}", f"{speed['decode']['compiled_tokens_per_s']:.1f}"),
        ("size (MB)", f"{os.path.getsize(onnx_path) / 1e6:.1f} (.onnx)", f"{os.path.getsize(lib_path) / 1e6:.1f} (.so)"),
    ]
    print()
    print("SmolLM2-135M-Instruct (fp32) — export -> compile -> evaluate -> generate")
    w0 = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"  {r[0]:<{w0}}  {r[1]:>18}  {r[2]:>18}")
    print(f"  perplexity agreement: {abs(ppl_c - ppl_o) / ppl_o * 100:.4f}% relative difference")
    print(f"  export {timings['export_s']:.1f}s, compile {timings['compile_s']:.1f}s")
    print(f"  generate (greedy, chat): {gen['text']!r}")
    result = {"evaluate": evals, "bench": speed, "generate": gen, "timings": timings,
              "sizes": {"onnx": os.path.getsize(onnx_path), "library": os.path.getsize(lib_path)}}
    with open(os.path.join(args.workdir, "demo.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"  (written to {os.path.join(args.workdir, 'demo.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
