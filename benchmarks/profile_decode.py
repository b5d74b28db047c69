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

The instrument hook adds its own cost to every call (a Python callback), which inflates the many
small calls of a decode step. ``--perf SECONDS`` measures instead with the Linux ``perf`` sampler
(no change to the code that runs): a child process repeats the decode step at context C (the
session's length is set back to C after each step, so every step attends to C + 1 keys), ``perf
record -p`` samples it for SECONDS, and the samples are split by symbol into matmul kernels
(lut16 / uniform kernels), attention kernel, other compiled kernels (norms, rope, element-wise,
copies: the library's generated functions) and everything else (VM, TVM runtime, Python, libc,
kernel, thread-pool waits).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time

import numpy as np

from common import write_results

KINDS = (  # (kind, pattern on the profiled function name), first match wins
    ("matmul", re.compile(r"shiftc_bcq|shiftc_fdb|matmul|dense|NT_matmul")),
    ("attention", re.compile(r"attention|kv_write|softmax")),
)


def kind_of(name: str) -> str:
    for kind, pat in KINDS:
        if pat.search(name):
            return kind
    return "other kernels"


PERF_KINDS = (  # (kind, pattern on a symbol of the model library), first match wins
    ("matmul", re.compile(r"lut8?_rows|lut8?_task|lut_block|mk_(avx|neon|scalar)|gemm_task|expand_|prepare_|run_task|"
                          r"shiftc_bcq|group_sum|table4|amx_")),
    ("attention", re.compile(r"attention")),
)


def perf_child(args) -> int:
    """The sampled process: decode steps at a fixed context, for --perf seconds (plus the warm-up)."""
    import shiftc

    sess = shiftc.load(args.library, threads=args.threads).lm_session()
    sess.step(np.random.default_rng(0).integers(0, sess.vocab, (1, args.context)))
    step = np.array([[11]], np.int64)
    for _ in range(5):
        sess.step(step, last_only=True)
        sess.length = args.context
    print("ready", flush=True)
    walls, t_end = [], time.perf_counter() + args.perf + 1.0
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        sess.step(step, last_only=True)
        walls.append((time.perf_counter() - t0) * 1e3)
        sess.length = args.context  # the next step overwrites row C: every step sees C + 1 keys
    print(json.dumps({"wall_ms": statistics.median(walls), "steps": len(walls)}), flush=True)
    return 0


def perf_main(args) -> int:
    import os
    import subprocess
    import tempfile

    lib_name = os.path.basename(args.library)
    child = subprocess.Popen([sys.executable, __file__, args.library, "--context", str(args.context), "--threads",
                              str(args.threads), "--perf", str(args.perf), "--perf-child"],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        subprocess.run(["perf", "record", "-q", "-F", "1999", "-p", str(child.pid), "-o", data, "--", "sleep",
                        str(args.perf)], check=True, stderr=subprocess.DEVNULL)
        info = json.loads(child.stdout.readline())
        child.wait()
        rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym", "--stdio",
                              "-F", "overhead,dso,sym", "--field-separator", "\t"],
                             capture_output=True, text=True, check=True).stdout
    by_kind: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    for line in rep.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        pct, dso, sym = float(parts[0].strip().rstrip("%")), parts[1].strip(), parts[2].strip()
        if dso == lib_name:
            kind = next((k for k, pat in PERF_KINDS if pat.search(sym)), "other compiled kernels")
        else:
            kind = "runtime, Python, libc, kernel, waits"
        by_kind[kind] = by_kind.get(kind, 0.0) + pct
        top.append((pct, f"{dso}: {sym}"))
    total = sum(by_kind.values()) or 1.0
    share = {k: v / total for k, v in by_kind.items()}
    outside = 1.0 - share.get("matmul", 0.0) - share.get("attention", 0.0)
    print(f"{args.library}: decode step at context {args.context}, {args.threads} thread(s), wall "
          f"{info['wall_ms']:.2f} ms (median of {info['steps']}); perf samples for {args.perf} s")
    for k, v in sorted(share.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<40} {100 * v:5.1f}%  ({v * info['wall_ms']:.3f} ms)")
    print(f"  outside the matmul and attention kernels: {100 * outside:.1f}%")
    print("  top symbols:")
    for pct, name in sorted(top, reverse=True)[:12]:
        print(f"    {pct:5.1f}%  {name[:100]}")
    if args.json:
        write_results(args.json, {"library": args.library, "context": args.context, "threads": args.threads,
                                  "method": "perf", "wall_ms": info["wall_ms"], "share": share,
                                  "outside_matmul_attention": outside})
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("library")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("--perf", type=float, default=0.0, metavar="SECONDS",
                   help="sample with Linux perf for this long instead of the instrument hook")
    p.add_argument("--perf-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.perf_child:
        return perf_child(args)
    if args.perf:
        return perf_main(args)

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
    # the function a single-token step runs: decode where the library has it (backend/compile.py)
    fn = "decode" if getattr(model, "_decode", None) is not None else "main"
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        (model._decode if fn == "decode" else model._main)(*tensors, *state)
        walls.append((time.perf_counter() - t0) * 1e3)
        timings.clear()
        prof_vm[fn](*tensors, *state)
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
    print(f"{args.library}: decode step ({fn}) after {args.context} tokens, {args.threads} thread(s), "
          f"wall {wall:.2f} ms (median of {args.repeats}), {sum(counts.values())} profiled calls")
    for k, v in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<36} {v:8.3f} ms  {100 * v / wall:5.1f}%")
    print("  top functions:")
    for name, ms in sorted(med.items(), key=lambda kv: -kv[1])[:15]:
        print(f"    {name[:60]:<60} x{counts.get(name, 0):<4} {ms:8.3f} ms")
    if args.json:
        write_results(args.json, {"library": args.library, "context": args.context, "threads": args.threads,
                                  "wall_ms": wall, "split_ms": split, "functions_ms": med, "calls": counts,
                                  "matmul_attention_share": (by_kind.get("matmul", 0) + by_kind.get("attention", 0))
                                  / wall})
    return 0


if __name__ == "__main__":
    sys.exit(main())
