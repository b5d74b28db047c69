"""Where a decode step's time goes: every VM call of one step of a compiled decoder, timed.

Prefills C tokens through an ``LMSession`` (in-place or functional KV cache, whatever the library
has), then runs the next one-token step with the Relax VM's instrument hook timing every call
instruction, several times, and reports
per function, the median time, and the split the decode-speed issue asks for: matmul kernels
(shift-add lut16 calls, scheduled fp32 matmuls), attention, everything else (norms, rope,
element-wise ops, copies) and the time outside any kernel (VM dispatch, allocation, thread-pool
start-up: the step's wall time minus the kernels' sum).

    .venv/bin/python benchmarks/profile_decode.py LIB.so [--context 128] [--threads 1]
        [--repeats 5] [--json out/profile.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time

import numpy as np

KINDS = (  # (kind, pattern on the profiled function name), first match wins
    ("matmul", re.compile(r"shiftc_bcq|shiftc_fdb|matmul|dense|NT_matmul")),
    ("attention", re.compile(r"attention|kv_write|softmax")),
)


def kind_of(name: str) -> str:
    for kind, pat in KINDS:
        if pat.search(name):
            return kind
    return "other kernels"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("library")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)

    import tvm
    from tvm.runtime.vm import VirtualMachine

    import shiftc

    model = shiftc.load(args.library, threads=args.threads)
    sess = model.lm_session()
    rng = np.random.default_rng(0)
    sess.step(rng.integers(0, sess.vocab, (1, args.context)))
    prof_vm = VirtualMachine(tvm.runtime.load_module(args.library), tvm.cpu())
    timings: list[tuple[str, float]] = []
    started: list[float] = []

    def instrument(func, name, before_run, ret, *call_args):  # times every VM call instruction
        if before_run:
            started.append(time.perf_counter())
        else:
            timings.append((name, (time.perf_counter() - started.pop()) * 1e3))
        return 0

    prof_vm.set_instrument(tvm.ffi.convert(instrument) if hasattr(tvm, "ffi") else instrument)
    total = sess.length + 1
    feeds = [np.array([[11]], np.int64), np.ones((1, total), np.int64), np.array([[total - 1]], np.int64)]
    tensors = [tvm.runtime.tensor(a) for a in feeds]
    state = sess._caches_for(total) if sess.inplace else sess.past
    per_call: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    walls = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model._main(*tensors, *state)
        walls.append((time.perf_counter() - t0) * 1e3)
        timings.clear()
        prof_vm["main"](*tensors, *state)
        sums: dict[str, float] = {}
        n: dict[str, int] = {}
        for name, ms in timings:
            sums[name] = sums.get(name, 0.0) + ms
            n[name] = n.get(name, 0) + 1
        for name, ms in sums.items():
            per_call.setdefault(name, []).append(ms)
        counts = n
    med = {name: statistics.median(v) for name, v in per_call.items()}
    wall = statistics.median(walls)
    by_kind: dict[str, float] = {}
    for name, ms in med.items():
        if name.startswith("vm.builtin") or name in ("vm.builtin.check_tensor_info",):
            k = "vm builtins"
        else:
            k = kind_of(name)
        by_kind[k] = by_kind.get(k, 0.0) + ms
    kernels = sum(v for k, v in by_kind.items() if k != "vm builtins")
    split = {**by_kind, "outside kernels (wall - kernels)": max(wall - kernels, 0.0)}
    print(f"{args.library}: decode step after {args.context} tokens, {args.threads} thread(s), "
          f"wall {wall:.2f} ms (median of {args.repeats}), {sum(counts.values())} profiled calls")
    for k, v in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<36} {v:8.3f} ms  {100 * v / wall:5.1f}%")
    print("  top functions:")
    for name, ms in sorted(med.items(), key=lambda kv: -kv[1])[:15]:
        print(f"    {name[:60]:<60} x{counts.get(name, 0):<4} {ms:8.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"library": args.library, "context": args.context, "threads": args.threads, "wall_ms": wall,
                       "split_ms": split, "functions_ms": med, "calls": counts,
                       "matmul_attention_share": (by_kind.get("matmul", 0) + by_kind.get("attention", 0)) / wall},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
