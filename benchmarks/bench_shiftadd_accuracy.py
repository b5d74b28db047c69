"""Accuracy of shift-add (BCQ + power-of-two scales, GPTQ-compensated) on SmolLM2-135M, side by side.

Perplexity with ONNX Runtime (shiftc.evaluate: non-overlapping windows of the held-out Wikipedia
split, each from an empty cache) of:
  fp32                       the exported model
  shiftadd q-bit             shiftc's pass (BcqMatMul run through its ONNX function body)
  rtn q-bit (dequantized)    round-to-nearest, uniform asymmetric per group, on the same layers as
                             shift-add; written back as fp32 weights for evaluation only
  ort-matmulnbits 4-bit      ONNX Runtime's own MatMulNBitsQuantizer (block 32 and 128); it only
                             quantizes MatMuls whose weight is an initializer, so the tied LM head
                             stays fp32 there
Bits per weight count the scales (and zero points), averaged over the quantized weights.

Note: the model's weights sit on a 4-bit grid of 32-blocks (GGUF Q4_1), so 4-bit results say
little; the comparison that matters is at 3 bits and below.

    .venv/bin/python benchmarks/bench_shiftadd_accuracy.py --tokens 32768 --window 512 \
        --out benchmarks/results/shiftadd_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import numpy_helper


def ppl(path: str, tokens: int, window: int, threads: int) -> float:
    import shiftc.api

    return shiftc.api.evaluate(path, tokens=tokens, window=window, threads=threads)["perplexity"]


def rtn_model(model: onnx.ModelProto, targets, bits: int, group: int) -> onnx.ModelProto:
    """A copy whose target weights are replaced by their RTN-dequantized values (fp32)."""
    from shiftc.passes import bcq
    from shiftc.passes.shiftadd import _remove_dead

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = {(n.name or n.output[0]): n for n in out.graph.node}
    for t in targets:
        w = numpy_helper.to_array(inits[t.weight]).astype(np.float32)
        w = w.T if t.transposed else w
        w_hat_t = np.ascontiguousarray(bcq.quantize_rtn(w, bits, group).T)  # [K, N]
        if t.transposed and t.bias is None:
            inits[t.weight].CopyFrom(numpy_helper.from_array(w_hat_t, t.weight))
        else:  # tied head: a new [K, N] initializer for the MatMul only (the Gather keeps fp32)
            name = f"{t.name}.rtn.T"
            out.graph.initializer.append(numpy_helper.from_array(w_hat_t, name))
            nodes[t.node].input[1] = name
    _remove_dead(out.graph)
    return out


def dequantized_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every BcqMatMul replaced by MatMul with Ŵᵀ reconstructed in numpy (fp32). ONNX Runtime gives
    the same logits as on the function bodies (tests/test_shiftadd.py checks it) but does not
    constant-fold 211 function bodies at session start, which needs far more memory than this
    shared machine has free."""
    from shiftc.passes import bcq

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = []
    for n in out.graph.node:
        if n.op_type != "BcqMatMul":
            nodes.append(n)
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        planes, exps = numpy_helper.to_array(inits[n.input[1]]), numpy_helper.to_array(inits[n.input[2]])
        w = bcq.reconstruct(bcq.unpack_planes(planes, a["in_features"]), bcq.exps_to_alpha(exps), a["group_size"])
        name = n.input[1] + ".dequant.T"
        out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
        nodes.append(onnx.helper.make_node("MatMul", [n.input[0], name], list(n.output), name=n.name))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.functions[:]
    from shiftc.passes.shiftadd import _remove_dead

    _remove_dead(out.graph)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported SmolLM2 .onnx (default: export it into the work folder)")
    p.add_argument("--work", default=None, help="folder for the models (default: a temporary one)")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--bits", default="3,2", help="shift-add / RTN bit widths")
    p.add_argument("--scale-mode", default="pow2")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--calib-window", type=int, default=256)
    p.add_argument("--ort-blocks", default="32,128", help="MatMulNBits 4-bit block sizes ('' to skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="reuse smol_sa{q}.onnx found in --work")
    p.add_argument("--out", default="benchmarks/results/shiftadd_accuracy.json")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import shiftc.api
    from shiftc.frontend.data import smollm2_gguf
    from shiftc.frontend.onnx_io import load_model, save_model
    from shiftc.passes import bcq
    from shiftc.passes.calibration import calibration_windows, collect_hessians
    from shiftc.passes.shiftadd import ShiftAddConfig, ShiftAddPass

    work = a.work or tempfile.mkdtemp(prefix="shiftadd_acc_")
    os.makedirs(work, exist_ok=True)
    src = a.model or os.path.join(work, "smol.onnx")
    if not os.path.exists(src):
        shiftc.export(str(smollm2_gguf()), src, max_positions=1024)
    model = load_model(src)
    rows, timings = [], {}

    def add(name, path, bpw, layers, note=""):
        t0 = time.perf_counter()
        v = ppl(path, a.tokens, a.window, a.threads)
        rows.append({"method": name, "perplexity": v, "bits_per_weight": bpw, "layers": layers, "note": note,
                     "size_mb": round(os.path.getsize(path) / 1e6, 1)})
        timings[f"ppl {name}"] = round(time.perf_counter() - t0, 1)
        with open(a.out + ".partial", "w") as f:  # partial results survive an interrupted run
            json.dump({"rows": rows, "timings_s": timings}, f, indent=2)
        print(f"  {name}: ppl {v:.3f}", file=sys.stderr, flush=True)

    add("fp32", src, 32.0, "all", "")
    bits_list = [int(b) for b in a.bits.split(",") if b]
    base = ShiftAddPass(ShiftAddConfig(group=a.group, scale_mode=a.scale_mode))
    targets, _ = base.match(model)
    t0 = time.perf_counter()
    ids = calibration_windows(model, windows=a.calib_windows, window=a.calib_window, model_path=src)
    need = [q for q in bits_list if not (a.reuse and os.path.exists(os.path.join(work, f"smol_sa{q}.onnx")))]
    hs = collect_hessians(model, [t.x for t in targets], ids, threads=a.threads) if need else None
    timings["calibration"] = round(time.perf_counter() - t0, 1)
    for q in bits_list:
        path = os.path.join(work, f"smol_sa{q}.onnx")
        if a.reuse and os.path.exists(path):  # a compressed model from an earlier run with the same settings
            sa_model = load_model(path)
            meta = json.loads({p.key: p.value for p in sa_model.metadata_props}["shiftc.compression"])
            bpw, note = meta["bits_per_weight"], "reused " + path
        else:
            t0 = time.perf_counter()
            res = ShiftAddPass(ShiftAddConfig(bits=q, group=a.group, scale_mode=a.scale_mode))(model, hs)
            timings[f"shiftadd {q}-bit"] = round(time.perf_counter() - t0, 1)
            save_model(res.model, path)
            errs = [e["rel_output_error"] for e in res.report["layers"].values()]
            bpw, note = res.report["bits_per_weight"], f"mean rel. output error {np.mean(errs):.4f}"
            sa_model = res.model
            del res
        deq = os.path.join(work, f"smol_sa{q}_deq.onnx")
        save_model(dequantized_copy(sa_model), deq)
        del sa_model
        add(f"shiftadd {q}-bit G{a.group} {a.scale_mode}", deq, bpw, f"{len(targets)} (incl. LM head)",
            f"GPTQ, calib {a.calib_windows}x{a.calib_window}; {note}; evaluated on Ŵ written back as fp32")
    for q in bits_list:
        path = os.path.join(work, f"smol_rtn{q}.onnx")
        save_model(rtn_model(model, targets, q, a.group), path)
        add(f"rtn {q}-bit G{a.group} (dequantized fp32)", path, bcq.bits_per_weight(q, a.group, method="rtn"),
            f"{len(targets)} (incl. LM head)", "uniform asymmetric, fp32 scale + q-bit zero point")
    for blk in [int(b) for b in a.ort_blocks.split(",") if b]:
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            qz = MatMulNBitsQuantizer(load_model(src), bits=4, block_size=blk, is_symmetric=False)
            qz.process()
            path = os.path.join(work, f"smol_nbits4_b{blk}.onnx")
            save_model(qz.model.model, path)
            n_q = sum(1 for n in qz.model.model.graph.node if n.op_type == "MatMulNBits")
            add(f"ort-matmulnbits 4-bit block {blk}", path, 4 + (32 + 4) / blk, f"{n_q} (LM head fp32)",
                "ONNX Runtime MatMulNBitsQuantizer, asymmetric")
        except Exception as e:  # report, do not hide
            rows.append({"method": f"ort-matmulnbits 4-bit block {blk}", "error": f"{type(e).__name__}: {e}"})

    fp = rows[0]["perplexity"]
    result = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", "tokens": a.tokens, "window": a.window,
              "corpus": "wikipedia/eval", "threads": a.threads, "rows": rows, "timings_s": timings}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"SmolLM2-135M perplexity, wikipedia/eval, {a.tokens} tokens, window {a.window}, ONNX Runtime")
    print(f"{'method':44} {'ppl':>9} {'x fp32':>7} {'bits/w':>7}  layers")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:44} error: {r['error']}")
        else:
            print(f"{r['method']:44} {r['perplexity']:9.3f} {r['perplexity'] / fp:7.3f} {r['bits_per_weight']:7.3f}  {r['layers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
