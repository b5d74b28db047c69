"""Accuracy of shift-add (BCQ + power-of-two scales, GPTQ-compensated) on SmolLM2-135M, side by side.

Perplexity with ONNX Runtime (shiftc.evaluate: non-overlapping windows of the held-out Wikipedia
split, each from an empty cache) of:
  fp32                       the exported model
  shiftadd q-bit             shiftc's pass with the recipe's settings (shiftc/passes/recipes/
                             shiftadd-3bit.yaml: scale mode, act order, calibration) at q bits on all 211 linear layers incl. the tied
                             LM head; evaluated on Ŵ written back as fp32 (the same logits as the
                             BcqMatMul function bodies, tests/test_shiftadd.py; ONNX Runtime would
                             need far more memory to constant-fold 211 function bodies)
  shiftadd q-bit, head fp32  the same model with the LM head left in fp32 (what ONNX Runtime's
                             quantizer does: it only quantizes MatMuls whose weight is an initializer)
  rtn q-bit (dequantized)    round-to-nearest, uniform asymmetric per group of the same size, on the
                             same layers; written back as fp32 weights for evaluation only
  gptq-uniform q-bit         GPTQ with a uniform asymmetric grid per group (shrink-searched range),
                             same calibration H, act order and damping as shift-add: the usual
                             integer weight-only quantizer, the reference for what BCQ gives up
                             (or gains) by its binary-coded, power-of-two-scaled grid
  ort-matmulnbits b-bit      ONNX Runtime's MatMulNBitsQuantizer (asymmetric, DEFAULT algorithm);
                             ONNX Runtime 1.32 supports 2, 4 and 8 bits (not 3); the tied LM head
                             stays fp32 there
Bits per weight count the scales (and zero points) and are averaged over ALL linear weights of the
model (211 layers, 134.5M weights; a layer kept in fp32 counts 32 bits), and over the quantized
layers only ("bpw_quantized").

Note: the model's weights sit on a 4-bit grid of 32-blocks with a per-block offset (GGUF Q4_1), so
4-bit results say little; the comparison that matters is at 3 bits and below.

Each row is cached in WORK/rows/<name>.json; with --reuse, rows and compressed models already in
WORK are reused, so parts can run as separate processes (--methods) and be merged by a last run:

    .venv/bin/python benchmarks/bench_shiftadd_accuracy.py --work out/bench/acc --reuse \
        --tokens 32768 --window 512 --threads 1 --out benchmarks/results/shiftadd_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnx

from common import write_results

METHODS = ("fp32", "shiftadd", "rtn", "gptq", "ort")


def _shard_nll(args) -> list[tuple[int, float, int]]:
    """(window index, NLL, predicted tokens) for windows[i::n], scored as shiftc.evaluation.perplexity does."""
    path, tokens, window, threads, i, n = args
    import torch

    torch.set_num_threads(1)
    from shiftc.backend.runtime import load
    from shiftc.evaluation import window_nll
    from shiftc.frontend.data import load_corpus, token_windows
    from shiftc.tokenizer import tokenizer_for

    model = load(path, threads)
    windows = token_windows(tokenizer_for(model.meta, None, model.path), load_corpus("wikipedia", "eval"),
                            window=window, n_tokens=tokens)
    session = model.lm_session(batch=1)
    out = []
    for j in range(i, len(windows), n):
        session.reset()
        out.append((j, *window_nll(session.step(windows[j][None])[0], windows[j])))
    return out


def ppl(path: str, tokens: int, window: int, threads: int, procs: int = 1) -> tuple[float, list[float]]:
    """Perplexity as shiftc.evaluate computes it (same windows, same per-window scores), and the mean
    NLL of each window; the windows are split over ``procs`` processes."""
    import math

    if procs <= 1:
        rows = _shard_nll((path, tokens, window, threads, 0, 1))
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(procs) as pool:
            rows = sorted(r for part in pool.map(_shard_nll, [(path, tokens, window, threads, i, procs)
                                                               for i in range(procs)]) for r in part)
    return math.exp(sum(r[1] for r in rows) / sum(r[2] for r in rows)), [r[1] / r[2] for r in rows]


def dequantized_model(model: onnx.ModelProto, targets, quantize) -> onnx.ModelProto:
    """A copy whose target weights are replaced by ``quantize(target, W [N, K])`` (dequantized fp32);
    the tied head gets its own [K, N] initializer, the Gather keeps the fp32 embedding."""
    from shiftc.passes.mixed_precision.assemble import with_weights
    from shiftc.passes.shiftadd import ShiftAddPass

    inits = {t.name: t for t in model.graph.initializer}
    by_name = {t.name: t for t in targets}
    return with_weights(model, targets, lambda name: quantize(by_name[name], ShiftAddPass.weight(inits, by_name[name])))

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported SmolLM2 .onnx (default: export it into the work folder)")
    p.add_argument("--work", required=True, help="folder for the models and cached rows")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--bits", default="3,2", help="shift-add / RTN bit widths")
    p.add_argument("--gptq-bits", default=None, help="bits of the gptq-uniform rows (default: --bits)")
    p.add_argument("--recipe", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shiftc", "passes",
                                                    "recipes", "shiftadd-3bit.yaml"),
                   help="shift-add recipe (its bits are overridden by --bits; group also used for RTN)")
    p.add_argument("--ort", default="4:128,4:32,2:32,2:128", help="MatMulNBits bits:block pairs ('' to skip)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--assemble-only", action="store_true", help="write the result from the cached rows only")
    p.add_argument("--earlier", help="JSON of an earlier run whose rows are added under 'earlier' (e.g. fewer tokens)")
    p.add_argument("--eval-procs", type=int, default=1, help="processes sharing each perplexity's windows")
    p.add_argument("--sa-rows", default="all,headfp32", help="shift-add rows: all (every layer), headfp32")
    p.add_argument("--reuse", action="store_true", help="reuse rows and smol_sa{q}.onnx found in --work")
    p.add_argument("--out", default="benchmarks/results/shiftadd_accuracy.json")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import shiftc.api
    from shiftc.frontend.data import smollm2_gguf
    from shiftc.frontend.onnx_io import load_model, save_model
    from shiftc.passes import bcq, ops
    from shiftc.passes.recipe import load_recipe
    from shiftc.passes.shiftadd import ShiftAddPass

    methods = set(a.methods.split(","))
    work = a.work
    os.makedirs(os.path.join(work, "rows"), exist_ok=True)
    src = a.model or os.path.join(work, "smol.onnx")
    if not os.path.exists(src):
        shiftc.export(str(smollm2_gguf()), src, max_positions=1024)
    model = load_model(src)
    defaults = load_recipe(a.recipe)
    cfg_sa, cfg_cal = defaults.shiftadd, defaults.calib
    targets, _ = ShiftAddPass(cfg_sa).match(model)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    sizes = {t.name: int(np.prod(dims[t.weight])) for t in targets}
    n_all = sum(sizes.values())
    head_n = sizes.get("lm_head", 0)

    def avg_bpw(bpw_quant: float, fp32_weights: int = 0) -> float:
        return (bpw_quant * (n_all - fp32_weights) + 32.0 * fp32_weights) / n_all

    def row(name, path_fn, **fields):
        cache = os.path.join(work, "rows", name.replace(" ", "_").replace("/", "-") + ".json")
        if a.reuse and os.path.exists(cache):
            with open(cache) as f:
                r = json.load(f)
            if r.get("tokens") == a.tokens and r.get("window") == a.window:
                print(f"  {name}: ppl {r['perplexity']:.3f} (cached)", file=sys.stderr, flush=True)
                return r
        if a.assemble_only:
            print(f"  {name}: not measured", file=sys.stderr, flush=True)
            return None
        path = path_fn()
        t0 = time.perf_counter()
        v, nll = ppl(path, a.tokens, a.window, a.threads, a.eval_procs)
        first = 8192 // a.window  # the first 8,192 tokens: the windows of the earlier 8k-token results
        r = {"method": name, "perplexity": v, "tokens": a.tokens, "window": a.window, **fields,
             "perplexity_first_8192_tokens": float(np.exp(np.mean(nll[:first]))) if len(nll) >= first else None,
             "window_mean_nll": nll,
             "eval_seconds": round(time.perf_counter() - t0, 1)}
        with open(cache, "w") as f:
            json.dump(r, f, indent=2)
        print(f"  {name}: ppl {v:.3f}", file=sys.stderr, flush=True)
        return r

    def hessians():
        """H = XᵀX per layer input, with the recipe's calibration (cached in WORK as .npz)."""
        from shiftc.passes.calibration import calibration_windows, collect_hessians

        path = os.path.join(work, f"H_{cfg_cal.windows}x{cfg_cal.window}.npz")
        if os.path.exists(path):
            with np.load(path) as d:
                return {k: d[k] for k in d.files}
        ids = calibration_windows(model, corpus=cfg_cal.corpus, split=cfg_cal.split, windows=cfg_cal.windows,
                                  window=cfg_cal.window, model_path=src)
        hs = collect_hessians(model, [t.x for t in targets], ids, threads=a.threads)
        np.savez(path + ".tmp.npz", **hs)
        os.replace(path + ".tmp.npz", path)
        return hs

    rows = []
    if "fp32" in methods:
        rows.append(row("fp32", lambda: src, bits_per_weight=32.0, bpw_quantized=32.0, layers="none quantized"))
    bits_list = [int(b) for b in a.bits.split(",") if b]
    mode = cfg_sa.scale_mode
    sa_desc = (f"{mode} G{cfg_sa.group}{' act-order' if cfg_sa.act_order else ''}, damp {cfg_sa.damp}, calib "
               f"{cfg_cal.windows}x{cfg_cal.window} wikipedia/calib"
               + (f", sequential {cfg_cal.sequential} stages" if getattr(cfg_cal, "sequential", 1) > 1 else ""))
    if "shiftadd" in methods:
        for q in bits_list:
            path = os.path.join(work, f"smol_sa{q}.onnx")
            if not (a.reuse and os.path.exists(path)):
                shiftc.api.compress(src, path, recipe=a.recipe, bits=q, threads=a.threads)

            def deq(fp32_head=None, q=q, path=path):
                out = os.path.join(work, f"smol_sa{q}_deq{'_headfp32' if fp32_head else ''}.onnx")
                if not (a.reuse and os.path.exists(out)):
                    sa_model = load_model(path)
                    save_model(ops.dequantized_copy(sa_model, fp32_head), out)
                return out

            sa_model = load_model(path)
            meta = json.loads({p_.key: p_.value for p_ in sa_model.metadata_props}["shiftc.compression"])
            del sa_model
            note = sa_desc
            if os.path.exists(path[:-5] + ".note.txt"):  # a model reused from another configuration says which
                with open(path[:-5] + ".note.txt") as f:
                    note = f.read().strip()
            elif meta["scale_mode"] != mode or meta["group"] != cfg_sa.group:
                raise SystemExit(f"{path}: {meta['scale_mode']} G{meta['group']} is not the recipe's; add {path[:-5]}.note.txt")
            bq = bcq.bits_per_weight(q, meta["group"], meta["scale_mode"])
            assert abs(meta["bits_per_weight"] - bq) < 1e-9 and meta["quantized_weights"] == n_all, meta["bits_per_weight"]
            tag = f"{meta['scale_mode']} G{meta['group']}"
            if "all" in a.sa_rows.split(","):
                rows.append(row(f"shiftadd {q}-bit {tag}", deq, bits_per_weight=avg_bpw(bq), bpw_quantized=bq,
                                layers=f"all {len(targets)} incl. LM head", note=note))
            emb = next(t.weight for t in targets if t.name == "lm_head")
            if "headfp32" in a.sa_rows.split(","):
                rows.append(row(f"shiftadd {q}-bit {tag}, head fp32", lambda: deq(emb), bits_per_weight=avg_bpw(bq, head_n),
                                bpw_quantized=bq, layers=f"{len(targets) - 1} (LM head fp32)", note=note))
    if "rtn" in methods:
        for q in bits_list:
            def rtn_path(q=q):
                path = os.path.join(work, f"smol_rtn{q}.onnx")
                if not (a.reuse and os.path.exists(path)):
                    save_model(dequantized_model(model, targets, lambda t, w: bcq.quantize_rtn(w, q, cfg_sa.group)), path)
                return path

            bq = bcq.bits_per_weight(q, cfg_sa.group, method="rtn")
            rows.append(row(f"rtn {q}-bit G{cfg_sa.group}", rtn_path, bits_per_weight=avg_bpw(bq), bpw_quantized=bq,
                            layers=f"all {len(targets)} incl. LM head",
                            note="uniform asymmetric, fp32 scale + q-bit zero point; dequantized fp32"))
    if "gptq" in methods:  # the uniform-grid GPTQ reference at the same bits, group and calibration H
        for q in [int(b) for b in (a.gptq_bits or a.bits).split(",") if b]:
            def gptq_path(q=q):
                path = os.path.join(work, f"smol_gptq{q}.onnx")
                if not (a.reuse and os.path.exists(path)):
                    hs = hessians()

                    def quant(t, w):
                        return bcq.quantize_gptq_uniform(w, hs[t.x], q, cfg_sa.group, damp=cfg_sa.damp,
                                                         act_order=cfg_sa.act_order)
                    save_model(dequantized_model(model, targets, quant), path)
                return path

            bq = bcq.bits_per_weight(q, cfg_sa.group, method="rtn")
            rows.append(row(f"gptq-uniform {q}-bit G{cfg_sa.group}", gptq_path, bits_per_weight=avg_bpw(bq),
                            bpw_quantized=bq, layers=f"all {len(targets)} incl. LM head",
                            note=f"GPTQ with a uniform asymmetric grid (bcq.quantize_gptq_uniform), {sa_desc}; "
                                 "dequantized fp32"))
    if "ort" in methods:
        for spec in [x for x in a.ort.split(",") if x]:
            for ob, blk in [tuple(int(v) for v in spec.split(":"))]:
                name = f"ort-matmulnbits {ob}-bit block {blk}"

                def ort_path(ob=ob, blk=blk):
                    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

                    path = os.path.join(work, f"smol_nbits{ob}_b{blk}.onnx")
                    if not (a.reuse and os.path.exists(path)):
                        qz = MatMulNBitsQuantizer(load_model(src), bits=ob, block_size=blk, is_symmetric=False)
                        qz.process()
                        n_q = sum(1 for n in qz.model.model.graph.node if n.op_type == "MatMulNBits")
                        assert n_q == len(targets) - 1, n_q  # every linear layer but the tied head
                        save_model(qz.model.model, path)
                    return path

                bq = ob + (32 + ob) / blk
                try:
                    rows.append(row(name, ort_path, bits_per_weight=avg_bpw(bq, head_n), bpw_quantized=bq,
                                    layers=f"{len(targets) - 1} (LM head fp32)",
                                    note="ONNX Runtime MatMulNBitsQuantizer, asymmetric, fp32 scale + zero point"))
                except Exception as e:  # report, do not hide
                    rows.append({"method": name, "error": f"{type(e).__name__}: {e}"})
                    print(f"  {name}: {rows[-1]['error']}", file=sys.stderr, flush=True)

    if set(METHODS) - methods:  # a part: the rows are cached, a full run writes the result
        return 0
    rows = [r for r in rows if r is not None]
    fp = rows[0]["perplexity"]
    result = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", "tokens": a.tokens, "window": a.window,
              "windows": a.tokens // a.window, "corpus": "wikipedia/eval", "threads": a.threads,
              "linear_weights": n_all, "lm_head_weights": head_n,
              "bits_per_weight_note": "averaged over all linear weights, fp32 layers at 32; scales and zero points counted",
              "rows": rows}
    if a.earlier:
        with open(a.earlier) as f:
            result["earlier"] = json.load(f)
    write_results(a.out, result)
    print(f"SmolLM2-135M perplexity, wikipedia/eval, {a.tokens} tokens, window {a.window}, ONNX Runtime")
    print(f"{'method':40} {'ppl':>11} {'x fp32':>8} {'bpw all':>8} {'bpw q':>7}  layers")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:40} error: {r['error']}")
        else:
            print(f"{r['method']:40} {r['perplexity']:11.3f} {r['perplexity'] / fp:8.3f} {r['bits_per_weight']:8.3f} "
                  f"{r['bpw_quantized']:7.3f}  {r['layers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
