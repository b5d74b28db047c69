"""Layer-level comparison of quantizers on SmolLM2-135M: relative output error ‖XWᵀ − XŴᵀ‖/‖XWᵀ‖.

For 12 representative layers (q_proj, o_proj, gate_proj, down_proj of blocks 2, 15 and 27) and the
calibration H = XᵀX of the shift-add recipe (shiftc/passes/recipes/shiftadd-3bit.yaml: 64 windows
of 512 tokens of the wikipedia calib split), at the same bits and group:
  shiftadd-pow2x2   BCQ with α = 2^e1 + 2^e2 inside GPTQ (the default)
  shiftadd-pow2     BCQ with α = 2^e
  gptq-uniform      GPTQ on a uniform asymmetric grid (bcq.quantize_gptq_uniform)
  rtn               round-to-nearest, uniform asymmetric
This is the cheap proxy behind the perplexity table of bench_shiftadd_accuracy.py: it shows how
much of the error is the grid and how much the layer. Prints a table, writes JSON.

    .venv/bin/python benchmarks/bench_quantizer_layers.py --model smol.onnx [--hessians H.npz]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from common import write_results

LAYERS = [f"model.layers.{b}.{m}.weight.T" for b in (2, 15, 27)
          for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="exported SmolLM2 .onnx (shiftc export)")
    p.add_argument("--hessians", help=".npz of H per layer input (written here when missing)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--recipe", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shiftc", "passes",
                                                    "recipes", "shiftadd-3bit.yaml"))
    p.add_argument("--out", default="benchmarks/results/quantizer_layers.json")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from shiftc.frontend.onnx_io import load_model
    from shiftc.passes import bcq
    from shiftc.passes.calibration import calibration_windows, collect_hessians
    from shiftc.passes.recipe import load_recipe
    from shiftc.passes.shiftadd import ShiftAddPass

    model = load_model(a.model)
    rec = load_recipe(a.recipe)
    sa, cal = rec.shiftadd, rec.calib
    targets = {t.name: t for t in ShiftAddPass(sa).match(model)[0]}
    inits = {t.name: t for t in model.graph.initializer}
    if a.hessians and os.path.exists(a.hessians):
        with np.load(a.hessians) as d:
            hs = {k: d[k] for k in d.files if k in {targets[n].x for n in LAYERS}}
    else:
        ids = calibration_windows(model, corpus=cal.corpus, split=cal.split, windows=cal.windows, window=cal.window,
                                  model_path=a.model)
        hs = collect_hessians(model, [t.x for t in targets.values()], ids, threads=1)
        if a.hessians:
            np.savez(a.hessians + ".tmp.npz", **hs)
            os.replace(a.hessians + ".tmp.npz", a.hessians)

    q, g = a.bits, sa.group
    methods = {
        "shiftadd-pow2x2": lambda w, h: bcq.quantize_gptq(w, h, q, g, scale_mode="pow2x2", damp=sa.damp,
                                                         act_order=sa.act_order, iters=sa.iters).dequantize(),
        "shiftadd-pow2": lambda w, h: bcq.quantize_gptq(w, h, q, g, scale_mode="pow2", damp=sa.damp,
                                                       act_order=sa.act_order, iters=sa.iters).dequantize(),
        "gptq-uniform": lambda w, h: bcq.quantize_gptq_uniform(w, h, q, g, damp=sa.damp, act_order=sa.act_order),
        "rtn": lambda w, h: bcq.quantize_rtn(w, q, g),
    }
    rows = {m: {} for m in methods}
    seconds = {m: 0.0 for m in methods}
    for name in LAYERS:
        t = targets[name]
        w, h = ShiftAddPass.weight(inits, t), hs[t.x]
        for m, fn in methods.items():
            t0 = time.perf_counter()
            w_hat = fn(w, h)
            seconds[m] += time.perf_counter() - t0
            rows[m][name] = bcq.relative_output_error(w, w_hat, h)
    result = {"model": a.model, "bits": q, "group": g, "calibration": f"{cal.windows}x{cal.window} {cal.corpus}/{cal.split}",
              "act_order": sa.act_order, "damp": sa.damp, "layers": LAYERS,
              "mean_rel_output_error": {m: float(np.mean(list(r.values()))) for m, r in rows.items()},
              "rel_output_error": rows, "seconds": {m: round(s, 1) for m, s in seconds.items()},
              "command": "benchmarks/bench_quantizer_layers.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_results(a.out, result)
    print(f"relative output error, {q}-bit G{g}, {len(LAYERS)} layers of SmolLM2-135M")
    print(f"{'layer':42}" + "".join(f"{m:>17}" for m in methods))
    for name in LAYERS:
        print(f"{name:42}" + "".join(f"{rows[m][name]:17.4f}" for m in methods))
    print(f"{'mean':42}" + "".join(f"{result['mean_rel_output_error'][m]:17.4f}" for m in methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
