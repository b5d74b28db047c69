"""Decode at 2 threads over 1 thread for one compiled decoder, the two alternated in one process.

Loads the library once, prefills a prompt of C tokens, then per round times ``--steps`` one-token
steps at 1 thread and at 2 (the order flips every round; the TVM thread pool is resized between
them and given 0.3 s to settle), each step attending to C + 1 keys. Within a round the two thread
counts see nearly the same load from elsewhere on a shared machine, so the per-round ratio is the
figure; the table prints each round's ratio, their median, and tok/s medians over all rounds.

    .venv/bin/python benchmarks/bench_thread_scaling.py LIB.so [--contexts 128,1024] [--rounds 8]
        [--steps 24] [--out benchmarks/results/thread_scaling.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from common import write_results


def scaling(session, set_threads, context: int, rounds: int, steps: int) -> dict:
    session.reset()
    session.step(np.random.default_rng(0).integers(100, session.vocab, (1, context)), last_only=True)
    times: dict[int, list[float]] = {1: [], 2: []}
    ratios = []
    for r in range(rounds):
        med = {}
        for threads in ((1, 2) if r % 2 == 0 else (2, 1)):
            set_threads(threads)
            time.sleep(0.3)
            ts = []
            for i in range(steps):
                t0 = time.perf_counter()
                session.step(np.array([[7 + i]]), last_only=True)
                ts.append(time.perf_counter() - t0)
                session.length = context  # the next step overwrites row C: every step sees C + 1 keys
            med[threads] = statistics.median(ts)
            times[threads] += ts
        ratios.append(med[1] / med[2])
    return {"context": context, "tok_s_1": 1 / statistics.median(times[1]), "tok_s_2": 1 / statistics.median(times[2]),
            "round_ratios": [round(x, 3) for x in ratios], "median_ratio": statistics.median(ratios)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("library", help="compiled causal-LM library (.so)")
    p.add_argument("--contexts", default="128,1024")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--out", default="benchmarks/results/thread_scaling.json")
    args = p.parse_args(argv)

    import shiftc
    from shiftc.backend.runtime import set_threads

    session = shiftc.load(args.library, threads=2).lm_session()
    rows = [scaling(session, set_threads, int(c), args.rounds, args.steps) for c in args.contexts.split(",")]
    print(f"{args.library}: decode, 2 threads / 1 thread, alternated in one process ({args.rounds} rounds x {args.steps} steps)")
    print(f"  {'context':>8} {'1 thread tok/s':>15} {'2 threads tok/s':>16} {'median ratio':>13}  per round")
    for r in rows:
        print(f"  {r['context']:>8} {r['tok_s_1']:>15.1f} {r['tok_s_2']:>16.1f} {r['median_ratio']:>13.2f}  "
              + " ".join(f"{x:.2f}" for x in r["round_ratios"]))
    write_results(args.out, {"library": args.library, "rounds": args.rounds, "steps": args.steps, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
