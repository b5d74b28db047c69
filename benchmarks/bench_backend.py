"""CPU backend speed: shiftc-compiled libraries vs ONNX Runtime (fp32), same thread count.

Cases: GEMV 1x4096 . 4096x4096, GEMM 128x4096 . 4096x4096 (MatMul with a constant weight and a
symbolic M, compiled once and run at both M), the same GEMV compiled with a static [1, 4096] input
(no symbolic axis: the one-row kernel without the ``m == 1`` branch), SmolLM2-135M decode (1 token with a 128-token KV
cache) and prefill (128 tokens), each at 1 and 2 threads. Runs alternate compiled / ORT so load
changes on the machine hit both; each reported time is the median, ratio = ORT / compiled
(>= 1: compiled is faster).

Each timed call starts after a short pause (``--gap``, default 0.1 s) so the other runtime's thread
pool is parked: after a run, ONNX Runtime's intra-op workers busy-spin (tens of ms) waiting for
more work, and TVM's workers spin-yield. Back to back, the compiled run of a 2-thread case
competes with ORT's spinning worker for the two cores (measured: GEMM 128x4096x4096 at 2 threads
2.1x slower; 1.0x with the pause; ORT's own time is unchanged by the pause).

    python benchmarks/bench_backend.py [--model out/bench/smol/smol.onnx] [--threads 1 2]
                                       [--json benchmarks/results/backend.json] [--skip-llm]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

import numpy as np

from common import work_dir, write_results
from shiftc.timing import alternate

HERE = os.path.dirname(os.path.abspath(__file__))


def _matmul_onnx(path: str, K: int, N: int, M: int | str = "M") -> None:
    """MatMul(x [M, K], W [K, N] constant); M symbolic (a name) or static (an int)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)


GAP_S = 0.1


def _alternate(fns: dict, rounds: int, warmup: int = 2) -> dict:
    """Median seconds of each callable, calls interleaved round by round, each after GAP_S."""
    times = alternate(fns, rounds, warmup=warmup, gap_s=GAP_S)
    return {k: float(np.median(v)) for k, v in times.items()}


def _row(case: str, threads: int, t: dict, extra: dict | None = None) -> dict:
    row = {
        "case": case,
        "threads": threads,
        "compiled_ms": round(t["compiled"] * 1e3, 3),
        "ort_ms": round(t["ort"] * 1e3, 3),
        "ratio": round(t["ort"] / t["compiled"], 3),
    }
    row.update(extra or {})
    print(f"{case:<28} {threads:>2}  {row['compiled_ms']:>10.3f}  {row['ort_ms']:>10.3f}  {row['ratio']:>6.2f}", flush=True)
    return row


def bench_matmul(workdir: str, threads_list, rounds: int) -> tuple[list, dict]:
    from shiftc.backend.compile import compile_model
    from shiftc.backend.runtime import load

    K = N = 4096
    onnx_path = os.path.join(workdir, "matmul4096.onnx")
    so_path = os.path.join(workdir, "matmul4096.so")
    _matmul_onnx(onnx_path, K, N)
    res = compile_model(onnx_path, so_path)
    static_onnx = os.path.join(workdir, "matmul4096_static.onnx")
    static_so = os.path.join(workdir, "matmul4096_static.so")
    _matmul_onnx(static_onnx, K, N, M=1)
    res_static = compile_model(static_onnx, static_so)
    rows = []
    rng = np.random.default_rng(1)
    for threads in threads_list:
        comp = load(so_path, threads=threads)
        ort = load(onnx_path, threads=threads)
        comp_static = load(static_so, threads=threads)
        ort_static = load(static_onnx, threads=threads)
        for name, M, r, c, o in (("GEMV 1x4096x4096", 1, rounds * 5, comp, ort),
                                 ("GEMV 1x4096x4096 static", 1, rounds * 5, comp_static, ort_static),
                                 ("GEMM 128x4096x4096", 128, rounds, comp, ort)):
            x = rng.standard_normal((M, K)).astype(np.float32)
            diff = float(np.abs(c.run({"x": x})["y"] - o.run({"x": x})["y"]).max())
            t = _alternate({"compiled": lambda: c.run({"x": x}), "ort": lambda: o.run({"x": x})}, r)
            rows.append(_row(name, threads, t, {"max_abs_diff": diff}))
    return rows, {"matmul_compile_s": round(res.seconds, 2),
                  "matmul_unscheduled_functions": res.metadata.get("unscheduled_functions"),
                  "matmul_static_unscheduled_functions": res_static.metadata.get("unscheduled_functions")}


def bench_llm(model_path: str, workdir: str, threads_list, rounds: int, so_path: str | None) -> tuple[list, dict]:
    from shiftc.backend.compile import compile_model
    from shiftc.backend.runtime import load

    info = {}
    if so_path is None:
        so_path = os.path.join(workdir, "smollm2.so")
        res = compile_model(model_path, so_path)
        info["smollm2_compile_s"] = round(res.seconds, 2)
        print(f"SmolLM2 compiled in {res.seconds:.1f} s", flush=True)
    rows = []
    prompt = np.random.default_rng(0).integers(0, 49152, (1, 128))
    for threads in threads_list:
        comp = load(so_path, threads=threads)
        ort = load(model_path, threads=threads)
        sessions = {"compiled": comp.lm_session(), "ort": ort.lm_session()}
        logits = {}

        def prefill(kind):
            s = sessions[kind]
            s.reset()
            logits[kind] = s.step(prompt)

        t = _alternate({k: (lambda k=k: prefill(k)) for k in sessions}, max(3, rounds // 3), warmup=1)
        diff = float(np.abs(logits["compiled"] - logits["ort"]).max())
        rows.append(_row("SmolLM2 prefill(128)", threads, t, {"max_abs_logits_diff": diff}))

        # decode: one token on top of the 128-token cache; reset the cache length each call so
        # every timed step sees the same past (128) and the cache does not grow.
        saved = {k: (list(s.past), s.length) for k, s in sessions.items()}

        def decode(kind):
            s = sessions[kind]
            s.past, s.length = list(saved[kind][0]), saved[kind][1]
            logits[kind] = s.step(np.array([[42]]))

        t = _alternate({k: (lambda k=k: decode(k)) for k in sessions}, rounds * 2)
        diff = float(np.abs(logits["compiled"] - logits["ort"]).max())
        extra = {"max_abs_logits_diff": diff, "compiled_tok_s": round(1 / t["compiled"], 2), "ort_tok_s": round(1 / t["ort"], 2)}
        rows.append(_row("SmolLM2 decode (past 128)", threads, t, extra))
    return rows, info


def main(argv=None) -> int:
    global GAP_S
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(work_dir("smol"), "smol.onnx"), help="SmolLM2 fp32 ONNX (exported if missing)")
    ap.add_argument("--so", default=None, help="an already compiled SmolLM2 library (skips compiling)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "backend.json"))
    ap.add_argument("--gap", type=float, default=GAP_S,
                    help="seconds of pause before each timed call, so the other runtime's threads are parked")
    ap.add_argument("--skip-llm", action="store_true")
    ap.add_argument("--skip-matmul", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("SHIFTC_QUIET", "1")
    GAP_S = args.gap

    rows, info = [], {}
    print(f"{'case':<28} {'th':>2}  {'compiled ms':>10}  {'ORT ms':>10}  {'ratio':>6}   (ratio = ORT / compiled)")
    with tempfile.TemporaryDirectory(prefix="shiftc-bench-") as work:
        if not args.skip_matmul:
            r, i = bench_matmul(work, args.threads, args.rounds)
            rows += r
            info.update(i)
        if not args.skip_llm:
            model = args.model
            if not os.path.exists(model):
                from shiftc.frontend.data import smollm2_gguf
                from shiftc.frontend.export import export

                os.makedirs(os.path.dirname(os.path.abspath(model)), exist_ok=True)
                export(str(smollm2_gguf()), model)
            r, i = bench_llm(model, work, args.threads, args.rounds, args.so)
            rows += r
            info.update(i)

    import onnxruntime
    import tvm

    from shiftc.targets import get_target

    spec = get_target("host")
    out = {
        "host": {"cpu": spec.description, "isa": spec.isa, "machine": platform.machine(), "cpus": os.cpu_count(),
                 "loadavg_end": os.getloadavg()},
        "versions": {"tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__},
        "method": "alternating compiled/ORT runs, each after a pause of gap_s, median; ratio = ORT time / compiled time",
        "gap_s": GAP_S,
        **info,
        "results": rows,
    }
    write_results(args.json, out)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
