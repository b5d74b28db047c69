"""Distillation of an FDB 2-bit SmolLM2-135M: deviation-aware (entropy-re-weighted KL) vs plain KL.

Starts from the binarized model that benchmarks/bench_fdb.py wrote (FDB 2-bit, GPTQ-calibrated),
fine-tunes its scales/offsets against the fp32 model (shiftc/passes/distill.py) with each loss at
the same budget (steps, learning rate, windows, seed), writes them back and measures perplexity
with ONNX Runtime on the held-out Wikipedia split (shiftc.evaluate, Ŵ written back as fp32: the
same numbers as the FdbMatMul function bodies). Training windows come from the calib split.

The two losses run as two processes side by side (1 thread each, same settings and seed), then
their rows are merged:

    for loss in dad kl; do OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fdb_distill.py \
        --model out/bench/fdb/smol_fdb_g128.onnx --losses $loss --steps 240 --lr 6e-4 --window 256 --windows 64 \
        --seed 0 --tokens 32768 --eval-window 512 --ptq-ppl 600.38 --fp32-ppl 26.32 --out out/bench/fdb/$loss.json & done; wait
    .venv/bin/python benchmarks/bench_fdb_distill.py --merge out/bench/fdb/dad.json out/bench/fdb/kl.json \
        --out benchmarks/results/fdb_distill.json

Tuning (learning rate, ...) uses ``--dev-windows N --no-eval``: the mean KL on N further windows
of the calib split, never the eval split. The plane-training tuning of
benchmarks/results/shiftadd_planes_tuning.json (shift-add 3-bit, 60 steps, scales + norm gains, then
with the planes trained at two latent learning rates; 128 windows, 8 dev windows):

    T="OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fdb_distill.py --model S --losses kl --norms --steps 60
       --lr 6e-4 --window 256 --windows 128 --dev-windows 8 --seed 0 --no-eval --ptq-ppl 59.68 --fp32-ppl 26.32"
    $T --out base.json; $T --planes --plane-lr 3e-4 --out p3e-4.json; $T --planes --plane-lr 1e-3 --out p1e-3.json
    .venv/bin/python benchmarks/bench_fdb_distill.py --merge base.json p3e-4.json p1e-3.json \
        --out benchmarks/results/shiftadd_planes_tuning.json

The same for FDB 2-bit (benchmarks/results/fdb_planes_tuning.json; scales only, no norm gains,
64 cached windows, as bench_dad_weights.py's rows, whose plain-KL run is the first row):

    P="OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fdb_distill.py --losses kl --model out/bench/fdb/smol_fdb_g128.onnx
       --steps 60 --lr 6e-4 --window 256 --windows 64 --dev-windows 8 --seed 0 --no-eval --ptq-ppl 600.38 --planes"
    $P --plane-lr 3e-4 --out planes_3e-4.json; $P --plane-lr 1e-3 --out planes_1e-3.json

``--cache-gb 0 --windows 400`` trains on 400 distinct windows (one pass, the teacher's logits
recomputed each step) instead of cycling through a cached few.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from common import write_results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="FDB-binarized SmolLM2 .onnx (bench_fdb.py's smol_fdb_g128.onnx)")
    p.add_argument("--source", help="fp32 PyTorch model, HF folder or .gguf (default: SmolLM2's GGUF)")
    p.add_argument("--losses", default="dad,kl")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--minutes", type=float, default=None, help="time bound per loss (steps still cap it)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--window", type=int, default=128, help="training tokens per window")
    p.add_argument("--windows", type=int, default=64, help="calibration windows cycled through")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="windows per step")
    p.add_argument("--dev-windows", type=int, default=0,
                   help="extra calib-split windows (after the training ones) on which the mean KL is measured: tuning metric")
    p.add_argument("--norms", action="store_true", help="also tune the RMSNorm gains (DistillConfig.norms)")
    p.add_argument("--planes", action="store_true", help="also train the planes (latent weights: DistillConfig.planes)")
    p.add_argument("--plane-lr", type=float, default=3e-4, help="learning rate of the latent weights (with --planes)")
    p.add_argument("--cache-gb", type=float, default=4.0, help="teacher logits cache bound (0: recompute each step)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity (tuning runs: dev KL only)")
    p.add_argument("--tokens", type=int, default=8192, help="evaluation tokens")
    p.add_argument("--eval-window", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ptq-ppl", type=float, help="perplexity of the model before distillation (skip measuring it)")
    p.add_argument("--fp32-ppl", type=float, help="fp32 perplexity for the ratio (from bench_fdb.py)")
    p.add_argument("--label", help="row label of the model (default from its compression metadata, e.g. 'shiftadd 3-bit')")
    p.add_argument("--out", default="benchmarks/results/fdb_distill.json")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="only merge the rows of these results (e.g. the dad and kl runs made side by side) into --out")
    a = p.parse_args(argv)
    if a.merge:
        return merge(a.merge, a.out)
    if not a.model:
        p.error("--model is required (unless --merge)")

    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    import shiftc.api
    from shiftc.frontend.data import smollm2_gguf
    from shiftc.frontend.onnx_io import load_model, save_model
    from shiftc.passes.binarize import dequantized_copy
    from shiftc.passes.calibration import calibration_windows
    from shiftc.passes.distill import DistillConfig, distill, load_teacher

    work = os.path.dirname(os.path.abspath(a.model))
    model = load_model(a.model)
    label = a.label or _label(model)
    result = {"model": a.model, "tokens": a.tokens, "window": a.eval_window, "corpus": "wikipedia/eval",
              "threads": a.threads, "train": {"steps": a.steps, "minutes": a.minutes, "lr": a.lr, "window": a.window,
                                               "windows": a.windows, "seed": a.seed, "batch": a.batch,
                                               "norms": a.norms, "planes": a.planes, "plane_lr": a.plane_lr if a.planes else None,
                                               "dev_windows": a.dev_windows, "split": "wikipedia/calib"},
              "fp32_perplexity": a.fp32_ppl, "rows": [],
              "command": f"OMP_NUM_THREADS={a.threads} .venv/bin/python benchmarks/bench_fdb_distill.py " + " ".join(argv or sys.argv[1:])}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)

    def ppl(m, name):
        path = os.path.join(work, f"{name}_deq.onnx")
        save_model(dequantized_copy(m), path)
        return shiftc.api.evaluate(path, tokens=a.tokens, window=a.eval_window, threads=a.threads)["perplexity"]

    if a.ptq_ppl is None and not a.no_eval:
        a.ptq_ppl = ppl(model, "ptq")
    result["rows"].append({"method": f"{label} PTQ", "perplexity": a.ptq_ppl})
    save()
    teacher = load_teacher(model, a.source or str(smollm2_gguf()))
    all_ids = calibration_windows(model, windows=a.windows + a.dev_windows, window=a.window, model_path=a.model)
    ids, dev = all_ids[:a.windows], (all_ids[a.windows:] if a.dev_windows else None)
    for loss in [x for x in a.losses.split(",") if x]:
        t0 = time.perf_counter()
        out, rep = distill(model, teacher, ids, DistillConfig(steps=a.steps, minutes=a.minutes, loss=loss, lr=a.lr,
                                                              seed=a.seed, batch=a.batch, cache_gb=a.cache_gb,
                                                              norms=a.norms, planes=a.planes, plane_lr=a.plane_lr),
                           dev_ids=dev)
        extra = [x for x, on in (("norms", a.norms), (f"planes {a.plane_lr:g}", a.planes)) if on]
        tag = f"{loss}{'_norms' if a.norms else ''}{f'_planes{a.plane_lr:g}' if a.planes else ''}_s{a.seed}"
        v = None
        if not a.no_eval:
            save_model(out, os.path.join(work, f"{os.path.splitext(os.path.basename(a.model))[0]}_distill_{tag}.onnx"))
            v = ppl(out, f"distill_{tag}")
        h = rep.pop("history")
        first = sum(e["kl"] for e in h[:5]) / max(len(h[:5]), 1)
        last = sum(e["kl"] for e in h[-5:]) / max(len(h[-5:]), 1)
        result["rows"].append({"method": f"{label} + distill ({', '.join([loss, *extra])})", "perplexity": v, **rep,
                               "kl_first5": first, "kl_last5": last, "seconds_total": round(time.perf_counter() - t0, 1),
                               "history": h})
        save()
        print(f"  {loss}: ppl {v} dev KL {rep.get('dev_kl_before')} -> {rep.get('dev_kl_after')}, dev NLL {rep.get('dev_nll_before')} -> {rep.get('dev_nll_after')} after {rep['steps']} steps ({rep['seconds']:.0f}s); KL {first:.4f} -> {last:.4f}",
              file=sys.stderr, flush=True)
    print(f"{'method':34} {'ppl':>10} {'x PTQ':>7}" + (f" {'x fp32':>7}" if a.fp32_ppl else ""))
    for r in result["rows"]:
        if r["perplexity"] is None or a.ptq_ppl is None:
            continue
        print(f"{r['method']:34} {r['perplexity']:10.3f} {r['perplexity'] / a.ptq_ppl:7.3f}"
              + (f" {r['perplexity'] / a.fp32_ppl:7.3f}" if a.fp32_ppl else ""))
    return 0


def _label(model) -> str:
    """'fdb 2-bit' / 'shiftadd 3-bit pow2x2 G128' from the model's shiftc.compression metadata."""
    from shiftc.passes.shiftadd import METADATA_KEY

    meta = json.loads({p.key: p.value for p in model.metadata_props}.get(METADATA_KEY, "{}"))
    bits = sorted({int(v["bits"]) for v in meta.get("layers", {}).values() if "bits" in v})
    mode = meta.get("mode") or meta.get("scale_mode", "")
    return " ".join(x for x in (meta.get("pass", "model"), "/".join(map(str, bits)) + "-bit" if bits else "",
                                mode, f"G{meta['group']}" if "group" in meta else "") if x)


def merge(paths: list[str], out: str) -> int:
    """One results file from runs made in separate processes (same settings, e.g. one per loss)."""
    runs = [json.load(open(p)) for p in paths]
    result = dict(runs[0])
    result["rows"] = [runs[0]["rows"][0]] + [r for run in runs for r in run["rows"][1:]]
    result["commands"] = [run["command"] for run in runs]
    result.pop("command", None)
    write_results(out, result)
    for r in result["rows"]:
        print(r["method"], r.get("seed", ""), r["perplexity"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
