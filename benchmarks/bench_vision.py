"""The Fashion-MNIST ResNet of shiftc.vision: fp32, and pruned by half its FLOPs then recovered.

Trains the net for its default steps (or ``--steps``; cached in shiftc's cache folder), exports it
(``shiftc export shiftc.vision:fashion_resnet``), then ``shiftc compress --prune 0.5 --prune-budget
flops --recover-steps R`` twice: recovery from the kept weights (fine-tune) and the pruned
architecture trained from scratch, the same R steps (the comparison of "Rethinking the Value of
Network Pruning"); and 2:4 sparsity, one-shot and trained in gradually over R steps (``--nm 2:4
--recover-steps R``: mask decay) — the compiled library runs its zeros densely. Every model is compiled for the host and scored on the 10,000 test images by
ONNX Runtime and by the library; batch 1 and batch 64 are timed at 1 thread (``shiftc bench``: the
library and ONNX Runtime alternated run by run), and the pruned libraries against the fp32 one.

    .venv/bin/python benchmarks/bench_vision.py [--steps N] [--recover-steps R] [--repeats 30]
        [--out benchmarks/results/vision.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from common import ROOT, work_dir, write_results


def _time_libraries(rows: dict, repeats: int) -> None:
    """The libraries alternated run by run on the same images, 1 thread: median ms per batch size."""
    import statistics

    import numpy as np

    import shiftc
    from shiftc.timing import alternate

    libs = {name: shiftc.load(row["library"], threads=1) for name, row in rows.items()}
    for batch in (1, 64):
        x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28)).astype(np.float32)
        times = alternate({name: (lambda m=m: m.run({"pixel_values": x})) for name, m in libs.items()}, repeats)
        for name, t in times.items():
            rows[name][f"batch{batch}_ms"] = round(statistics.median(t) * 1e3, 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, help="training steps of 128 images (default: shiftc.vision.DEFAULT_STEPS)")
    p.add_argument("--recover-steps", type=int, help="recovery steps after pruning (default: as many as --steps)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "vision.json"))
    args = p.parse_args(argv)

    import shiftc
    from shiftc import vision

    steps = args.steps or vision.DEFAULT_STEPS
    recover = args.recover_steps or steps
    os.environ[vision.STEPS_ENV] = str(steps)
    work = work_dir("vision")
    onnx_path = os.path.join(work, f"resnet-{steps}.onnx")
    t0 = time.perf_counter()
    shiftc.export("shiftc.vision:fashion_resnet", onnx_path)  # trains unless the weights are cached
    models = {"fp32": {"onnx": onnx_path, "seconds": round(time.perf_counter() - t0, 1)}}
    for init in ("finetune", "scratch"):
        path = os.path.join(work, f"resnet-{steps}-prune50-{init}{recover}.onnx")
        rep = shiftc.compress(onnx_path, path, prune=0.5, prune_budget="flops", recover_steps=recover,
                              recover_init=init)
        models[f"pruned 50% FLOPs, {init}"] = {"onnx": path, "seconds": rep["seconds"],
                                               "removed_flops": rep["prune"]["removed_fraction"]}
    for label, kw in (("2:4 one-shot", {}), ("2:4 gradual", {"recover_steps": recover})):
        path = os.path.join(work, f"resnet-{steps}-nm24{'-gradual' + str(recover) if kw else ''}.onnx")
        rep = shiftc.compress(onnx_path, path, nm="2:4", prune_criterion="magnitude", **kw)
        models[label] = {"onnx": path, "seconds": rep["seconds"], "nm_layers": len(rep["prune"]["nm"]["layers"])}
    rows = {}
    for name, m in models.items():
        lib = m["onnx"][:-5] + ".so"
        shiftc.compile(m["onnx"], lib)
        row = {k: shiftc.evaluate(path, task="top1", threads=1)["top1"] for k, path in (("top1_onnxruntime", m["onnx"]),
                                                                                         ("top1_compiled", lib))}
        for batch in (1, 64):
            r = shiftc.bench(lib, threads=1, repeats=args.repeats, dims={"batch": batch})
            row[f"batch{batch}_vs_onnxruntime"] = round(r["ratio"], 3)
        rows[name] = {**{k: v for k, v in m.items() if k != "onnx"}, **row, "library": lib}
    _time_libraries(rows, args.repeats)
    base = rows["fp32"]
    for row in rows.values():
        row["top1_points_vs_fp32"] = round(100 * (row["top1_compiled"] - base["top1_compiled"]), 2)
        for batch in (1, 64):
            row[f"batch{batch}_speedup_vs_fp32"] = round(base[f"batch{batch}_ms"] / row[f"batch{batch}_ms"], 3)
    print(f"Fashion-MNIST ResNet ({vision.parameters(vision.trained_resnet(steps))} parameters, {steps} steps; "
          f"recovery {recover} steps), 1 thread")
    print(f"{'model':34s} {'top-1 ORT':>9s} {'compiled':>9s} {'pts':>6s} {'b1 ms':>8s} {'x fp32':>7s} "
          f"{'b64 ms':>8s} {'x fp32':>7s}")
    for name, r in rows.items():
        print(f"{name:34s} {r['top1_onnxruntime']:9.4f} {r['top1_compiled']:9.4f} {r['top1_points_vs_fp32']:6.2f} "
              f"{r['batch1_ms']:8.3f} {r['batch1_speedup_vs_fp32']:7.2f} {r['batch64_ms']:8.3f} "
              f"{r['batch64_speedup_vs_fp32']:7.2f}")
    result = {"model": "shiftc.vision:fashion_resnet", "train_steps": steps, "recover_steps": recover,
              "test_images": 10000, "threads": 1, "models": rows, "loadavg": os.getloadavg()}
    write_results(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
