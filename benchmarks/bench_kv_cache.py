"""In-place KV cache vs the graph's functional cache (Concat of past and new every step).

Compiles one decoder twice — ``shiftc compile`` (in-place caches, the default) and ``--kv-cache
concat`` — or takes the two libraries, then times one-token decode steps after a prompt of C
tokens, the two libraries alternated step by step. It reports the median wall time and the
median CPU time of the calling thread (``time.thread_time``: at 1 thread the step runs on it, so
time the process spent preempted by other jobs on a shared machine is left out), per context.

    .venv/bin/python benchmarks/bench_kv_cache.py --onnx M.onnx [--workdir out/bench-kv]
    .venv/bin/python benchmarks/bench_kv_cache.py --libs INPLACE.so CONCAT.so
        [--contexts 128,1024] [--steps 12] [--out benchmarks/results/kv_cache.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from common import write_results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", help="decoder .onnx to compile both ways")
    src.add_argument("--libs", nargs=2, metavar=("INPLACE", "CONCAT"))
    p.add_argument("--workdir", default="out/bench-kv")
    p.add_argument("--contexts", default="128,1024")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default="benchmarks/results/kv_cache.json")
    args = p.parse_args(argv)

    import shiftc

    if args.onnx:
        os.makedirs(args.workdir, exist_ok=True)
        libs = [os.path.join(args.workdir, f"{m}.so") for m in ("inplace", "concat")]
        for lib, mode in zip(libs, ("inplace", "concat")):
            shiftc.compile(args.onnx, lib, kv_cache=mode)
    else:
        libs = list(args.libs)
    models = [shiftc.load(lib, threads=1) for lib in libs]
    modes = [m.meta.get("kv_cache", {}).get("mode") for m in models]
    if modes != ["inplace", "concat"]:
        raise SystemExit(f"expected an in-place and a concat library, got {modes}")
    rng = np.random.default_rng(0)
    rows = {}
    for c in (int(x) for x in args.contexts.split(",")):
        sessions = [m.lm_session() for m in models]
        prompt = rng.integers(0, sessions[0].vocab, (1, c))
        for s in sessions:
            s.step(prompt, last_only=True)
        wall = [[], []]
        cpu = [[], []]
        for _ in range(args.steps):
            for i, s in enumerate(sessions):
                t0, c0 = time.perf_counter(), time.thread_time()
                s.step(np.array([[11]]), last_only=True)
                wall[i].append((time.perf_counter() - t0) * 1e3)
                cpu[i].append((time.thread_time() - c0) * 1e3)
        row = {mode: {"wall_ms": statistics.median(w), "cpu_ms": statistics.median(t)}
               for mode, w, t in zip(("inplace", "concat"), wall, cpu)}
        row["cpu_ratio_concat_over_inplace"] = row["concat"]["cpu_ms"] / row["inplace"]["cpu_ms"]
        rows[f"C={c}"] = row
        print(f"C={c:5d}  in-place {row['inplace']['cpu_ms']:7.2f} ms cpu ({row['inplace']['wall_ms']:7.2f} wall)   "
              f"concat {row['concat']['cpu_ms']:7.2f} ms cpu ({row['concat']['wall_ms']:7.2f} wall)   "
              f"concat/in-place {row['cpu_ratio_concat_over_inplace']:.2f}x")
    result = {"libraries": libs, "threads": 1, "steps": args.steps, "loadavg": os.getloadavg(), "contexts": rows}
    write_results(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
