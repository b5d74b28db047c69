"""The Fashion-MNIST ResNet of shiftc.vision: fp32 top-1 and latency, compiled vs ONNX Runtime.

Trains the net for its default steps (or ``--steps``; cached in shiftc's cache folder), exports it
(``shiftc export shiftc.vision:fashion_resnet``), compiles it for the host, scores both on the
10,000 test images, and times batch 1 and batch 64 at 1 thread, the two alternated run by run
(``shiftc bench``). This is the baseline the compressed variants (pruning with recovery, AdaPT,
N:M) are compared with.

    .venv/bin/python benchmarks/bench_vision.py [--steps N] [--repeats 30] [--out benchmarks/results/vision.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from common import ROOT, work_dir, write_results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, help="training steps of 128 images (default: shiftc.vision.DEFAULT_STEPS)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "vision.json"))
    args = p.parse_args(argv)

    import shiftc
    from shiftc import vision

    steps = args.steps or vision.DEFAULT_STEPS
    os.environ[vision.STEPS_ENV] = str(steps)
    work = work_dir("vision")
    onnx_path, lib = os.path.join(work, f"resnet-{steps}.onnx"), os.path.join(work, f"resnet-{steps}.so")
    t0 = time.perf_counter()
    shiftc.export("shiftc.vision:fashion_resnet", onnx_path)  # trains unless the weights are cached
    export_s = time.perf_counter() - t0
    shiftc.compile(onnx_path, lib)
    top1 = {k: shiftc.evaluate(path, task="top1", threads=1)["top1"] for k, path in (("onnxruntime", onnx_path),
                                                                                      ("compiled", lib))}
    latency = {}
    for batch in (1, 64):
        r = shiftc.bench(lib, threads=1, repeats=args.repeats, dims={"batch": batch})
        latency[f"batch {batch}"] = {**{k: round(v, 3) for k, v in r["latency_ms"].items()},
                                     "speedup_vs_onnxruntime": round(r["ratio"], 3)}
    print(f"Fashion-MNIST ResNet ({vision.parameters(vision.trained_resnet(steps))} parameters, {steps} steps): "
          f"top-1 {top1['onnxruntime']:.4f} (ONNX Runtime) / {top1['compiled']:.4f} (compiled)")
    for k, v in latency.items():
        print(f"  {k:9s} 1 thread: compiled {v['compiled']:.3f} ms, ONNX Runtime {v['onnxruntime']:.3f} ms "
              f"({v['speedup_vs_onnxruntime']:.2f}x)")
    result = {"model": "shiftc.vision:fashion_resnet", "train_steps": steps, "batch": 128,
              "export_with_training_s": round(export_s, 1), "top1": top1, "test_images": 10000,
              "latency_ms_1_thread": latency, "loadavg": os.getloadavg()}
    write_results(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
