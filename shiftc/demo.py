"""``make demo``: the main job on the embedded default model, SmolLM2-135M-Instruct.

export (GGUF -> ONNX with KV cache) -> compile (host CPU) -> evaluate perplexity with ONNX Runtime
and with the compiled library on the same held-out Wikipedia tokens -> decode/prefill speed of
both -> generate a short answer; then the same model compressed by the shift-add pass with the
default recipe (shiftc/passes/recipes/uniform-4bit.yaml: every matrix on a 4-bit grid per 32
columns as bit planes whose scales are a shift apart, the LM head and the embedding one tied copy,
calibrated on the Wikipedia calibration split) and compiled with the LUT kernels: its perplexity on
the same tokens, size and speed beside the fp32 ones (``--recipe`` picks another recipe,
``--no-compress`` skips that part). Prints a final table, and the side-by-side benchmark's rows
(llama.cpp, ONNX Runtime GenAI) when its JSON is present; writes the table as JSON.
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
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="compression recipe (default: %(default)s)")
    p.add_argument("--compress", action=argparse.BooleanOptionalAction, default=True,
                   help="also compress with the recipe, compile it and compare (default; calibration and "
                        "the quantizer take a few minutes on 2 cores)")
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
    if _stale(lib_path, onnx_path, *_backend_sources()):
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

    sa = None
    if args.compress:
        sa = _compressed(args, onnx_path, threads, timings)

    ppl_o, ppl_c = evals["onnxruntime"]["perplexity"], evals["compiled"]["perplexity"]
    rows = [
        ("", "ONNX Runtime", "shiftc compiled"),
        ("perplexity (wikipedia eval)", f"{ppl_o:.3f}", f"{ppl_c:.3f}"),
        ("  tokens scored", str(evals["onnxruntime"]["tokens_scored"]), str(evals["compiled"]["tokens_scored"])),
        (f"prefill t/s ({threads} threads)", f"{speed['prefill']['onnxruntime_tokens_per_s']:.1f}", f"{speed['prefill']['compiled_tokens_per_s']:.1f}"),
        (f"decode t/s ({threads} threads)", f"{speed['decode']['onnxruntime_tokens_per_s']:.1f}", f"{speed['decode']['compiled_tokens_per_s']:.1f}"),
        ("size (MB)", f"{os.path.getsize(onnx_path) / 1e6:.1f} (.onnx)", f"{os.path.getsize(lib_path) / 1e6:.1f} (.so)"),
    ]
    if sa is not None:
        rows[0] += (sa["label"],)
        rows[1] += (f"{sa['eval']['perplexity']:.3f}",)
        rows[2] += (str(sa["eval"]["tokens_scored"]),)
        rows[3] += (f"{sa['bench']['prefill']['compiled_tokens_per_s']:.1f}",)
        rows[4] += (f"{sa['bench']['decode']['compiled_tokens_per_s']:.1f}",)
        rows[5] += (f"{sa['library_bytes'] / 1e6:.1f} (.so)",)
    print()
    print("SmolLM2-135M-Instruct — export -> compile -> evaluate -> generate"
          + ("" if sa is None else f" -> {sa['label']}"))
    w0 = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"  {r[0]:<{w0}}" + "".join(f"  {c:>18}" for c in r[1:]))
    print(f"  perplexity agreement: {abs(ppl_c - ppl_o) / ppl_o * 100:.4f}% relative difference")
    print(f"  export {timings['export_s']:.1f}s, compile {timings['compile_s']:.1f}s")
    print(f"  generate (greedy, chat): {gen['text']!r}")
    if sa is not None:
        d = sa["bench"]["decode"]
        print(f"  {sa['label']}: {sa['report'].get('bits_per_weight', float('nan')):.2f} bits per quantized weight "
              f"(scales included); decode {d['ratio']:.2f}x ONNX Runtime fp32, "
              f"{d['compiled_tokens_per_s'] / speed['decode']['compiled_tokens_per_s']:.2f}x compiled fp32; "
              f"perplexity {sa['eval']['perplexity'] / ppl_o:.2f}x fp32; compress {timings['compress_s']:.0f}s")
        print(f"  generate ({sa['label']}): {sa['generate']['text']!r}")
    _print_llamacpp()
    result = {"evaluate": evals, "bench": speed, "generate": gen, "timings": timings, "shiftadd": sa,
              "sizes": {"onnx": os.path.getsize(onnx_path), "library": os.path.getsize(lib_path)}}
    with open(os.path.join(args.workdir, "demo.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"  (written to {os.path.join(args.workdir, 'demo.json')})")
    return 0


LLAMACPP_JSON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results",
                             "vs_llamacpp.json")
DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "passes", "recipes", "uniform-4bit.yaml")


def _stale(path: str, *sources: str) -> bool:
    """Whether ``path`` is missing or older than any of ``sources`` (which must exist)."""
    return not os.path.exists(path) or os.path.getmtime(path) < max(os.path.getmtime(p) for p in sources)


def _backend_sources() -> list[str]:
    """The files a compiled library depends on beside its ONNX file: the backend's Python and the
    C kernels linked into it (a library built by an older checkout is rebuilt)."""
    from .backend.kernels import csrc_dir

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend")
    files = [os.path.join(d, f) for d, _, fs in os.walk(here) for f in fs if f.endswith(".py")]
    kernels = os.path.join(str(csrc_dir()), "kernels")
    return files + [os.path.join(kernels, f) for f in os.listdir(kernels) if f.endswith(".cc")]


def _print_llamacpp(path: str = LLAMACPP_JSON) -> None:
    """The side-by-side benchmark's rows (benchmarks/bench_vs_llamacpp.py), when its JSON is there:
    the peer a user would otherwise run, measured on the same windows and machine kind."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        res = json.load(f)
    cells = sorted({c for s in res.get("speed", {}).values() for c in s if c.startswith("decode")})
    print(f"  beside llama.cpp ({os.path.relpath(path)}; {res.get('config', {}).get('tokens', '?')} held-out "
          f"tokens; decode tok/s):")
    print(f"    {'library':<28}{'MB':>8}{'perplexity':>12}" + "".join(f"{c.replace('decode ', ''):>16}" for c in cells))
    for label, lib in res.get("libraries", {}).items():
        ppl = res.get("perplexity", {}).get(label, {}).get("perplexity")
        speed = res.get("speed", {}).get(label, {})
        print(f"    {label:<28}{lib.get('bytes', 0) / 1e6:>8.1f}{(f'{ppl:.2f}' if ppl else '-'):>12}"
              + "".join(f"{speed[c]['tokens_per_s']:>16.1f}" if c in speed else f"{'-':>16}" for c in cells))


def _compressed(args, onnx_path: str, threads: int, timings: dict) -> dict:
    """Compress with the recipe -> compile -> evaluate -> bench -> generate (the demo's second column)."""
    name = os.path.splitext(os.path.basename(args.recipe))[0]
    sa_onnx = os.path.join(args.workdir, f"smollm2-135m-{name}.onnx")
    sa_lib = os.path.join(args.workdir, f"smollm2-135m-{name}.so")
    report_path = sa_onnx + ".demo-report.json"
    t0 = time.perf_counter()
    if not os.path.exists(sa_onnx) or os.path.getmtime(sa_onnx) < max(os.path.getmtime(onnx_path),
                                                                        os.path.getmtime(args.recipe)) \
            or not os.path.exists(report_path):
        log(f"compressing: recipe {args.recipe}")
        report = api.compress(onnx_path, sa_onnx, recipe=args.recipe, threads=args.threads)
        with open(report_path, "w") as f:
            json.dump({k: v for k, v in report.items() if k != "layers"}, f, default=str)
    with open(report_path) as f:
        report = json.load(f)
    timings["compress_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if _stale(sa_lib, sa_onnx, *_backend_sources()):
        api.compile(sa_onnx, sa_lib, target="host")
    timings["compile_shiftadd_s"] = time.perf_counter() - t0
    log(f"perplexity with the shift-add library on {args.tokens} held-out tokens")
    ev = api.evaluate(sa_lib, tokens=args.tokens, window=args.window, threads=args.threads)
    bench = api.bench(sa_lib, reference=onnx_path, threads=threads, repeats=3, prefill=128, decode=16)
    gen = api.load(sa_lib, threads=args.threads).generate(
        "What is the capital of France?", chat=True, max_new_tokens=args.max_new_tokens, greedy=True)
    return {"label": name, "eval": ev, "bench": bench, "generate": gen, "report": report,
            "library_bytes": os.path.getsize(sa_lib)}


if __name__ == "__main__":
    sys.exit(main())
