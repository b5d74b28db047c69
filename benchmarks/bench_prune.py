"""Structured pruning: validity, compiled speed and accuracy (shiftc/passes/prune).

SmolLM2-135M-Instruct, ~25% of the transformer blocks' parameters removed (MLP channels and one
of the three KV groups with its three query heads in every layer), criteria LoRAPrune (LoRA
gradients during the fine-tune), activation (|W|·‖x‖, 16 calibration windows of 256 tokens) and
magnitude (|W|²), each followed by (lorapr: combined with) the same LoRA fine-tune (rank 8,
--recover-steps windows of 128 tokens of the Wikipedia calibration split, seed 0, 1 thread):
    valid ONNX (onnx.checker full check + strict shape inference, ONNX Runtime runs it),
    compiled decode / prefill tokens/s of the pruned vs the unpruned library (alternating runs,
    one process, same threads), perplexity on the held-out Wikipedia split (ONNX Runtime) of
    fp32, magnitude and activation.
EfficientNet-Lite0, 30% of the FLOPs removed by channel pruning (activation criterion on
scikit-image's photos; magnitude beside it): valid ONNX, compiled latency ratio, top-1 agreement
with the unpruned model on the same photos.

    python benchmarks/bench_prune.py [--smollm2 smollm2.onnx] [--effnet effnet.onnx] [--work DIR]
                                     [--threads 1] [--tokens 8192] [--recover-steps 40] [--reuse]
                                     [--skip effnet] [--json benchmarks/results/prune.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import onnx

import shiftc
from common import read_results, work_dir, write_results
from shiftc.timing import alternate
from shiftc.frontend.onnx_io import load_model, save_model
from shiftc.passes.prune import PruneConfig
from shiftc.passes.prune.run import prune_model
from shiftc.passes.recipe import CalibConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def _valid(path: str) -> dict:
    import onnxruntime as ort

    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    onnx.shape_inference.infer_shapes(m, strict_mode=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return {"checker_full": True, "strict_shape_inference": True, "onnxruntime_loads": True}


def _params(path: str) -> int:
    m = onnx.load(path)
    return int(sum(np.prod(t.dims) for t in m.graph.initializer if "layers." in t.name))


def _prune(src: str, dst: str, cfg: PruneConfig, threads: int) -> dict:
    t0 = time.perf_counter()
    model, rep = prune_model(load_model(src), cfg, CalibConfig(), model_path=src, threads=threads)
    save_model(model, dst)
    rep = {k: v for k, v in rep.items() if k != "groups"} | {
        "kept": {g["root"]: [g["kept"], g["units"]] for g in rep.get("groups", []) if g["status"] == "pruned"}}
    return {"path": dst, "seconds": round(time.perf_counter() - t0, 1), "report": rep, "valid": _valid(dst)}


def bench_smollm2(args, out: dict) -> None:
    src = args.smollm2
    if not src:
        from shiftc.frontend.data import smollm2_gguf

        src = os.path.join(args.work, "smollm2.onnx")
        if not os.path.exists(src):
            shiftc.export(str(smollm2_gguf()), src, max_positions=1024)
    lora = {"steps": args.recover_steps, "window": 128, "batch": 1, "rank": 8, "alpha": 16, "lr": args.lora_lr,
            "seed": 0, "data": "wikipedia calib split (never the eval split)",
            "targets": "q/k/v/o/gate/up/down of every layer", "threads": args.threads}
    res = {"source": src, "ratio": 0.25, "scope": ["mlp", "heads"], "recovery": lora}
    paths = {}
    for crit in args.criteria:
        dst = os.path.join(args.work, f"smollm2_prune25_{crit}_lora{args.recover_steps}.onnx")
        cache = dst + ".json"
        if args.reuse and os.path.exists(cache):
            with open(cache) as f:
                res[crit] = json.load(f)
        else:
            cfg = PruneConfig(ratio=0.25, criterion=crit, scope=["mlp", "heads"], recover_steps=args.recover_steps,
                              lora_lr=args.lora_lr, lora_window=128)
            res[crit] = _prune(src, dst, cfg, args.threads)
            with open(cache, "w") as f:
                json.dump(res[crit], f)
        print(crit, json.dumps({k: v for k, v in res[crit]["report"].items() if k != "kept"}), flush=True)
        paths[crit] = dst
    base_params = _params(src)
    first = paths[args.criteria[0]]
    res["block_params"] = {"fp32": base_params, "pruned": _params(first),
                           "removed_fraction": round(1 - _params(first) / base_params, 4)}
    res["mlp_widths"] = sorted({v[0] for k, v in res[args.criteria[0]]["report"]["kept"].items() if "mlp" in k})
    # compiled speed: unpruned vs pruned, alternating in one process (the kept widths are the same
    # for every criterion: the budget fixes the counts, the criterion only which units)
    libs = {"fp32": args.fp32_lib or os.path.join(args.work, "smollm2_fp32.so"),
            "pruned": os.path.join(args.work, f"smollm2_pruned_{args.criteria[0]}.so")}
    for name, p in (("fp32", src), ("pruned", first)):
        if args.reuse and os.path.exists(libs[name]):
            continue
        t0 = time.perf_counter()
        shiftc.compile(p, libs[name])
        res.setdefault("compile_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    models = {k: shiftc.load(v, threads=args.threads) for k, v in libs.items()}
    sessions = {k: m.lm_session() for k, m in models.items()}
    prompt = np.random.default_rng(0).integers(0, 49152, (1, 128))

    def prefill(s):
        def run():
            s.reset()
            s.step(prompt, last_only=True)
        return run

    pre = alternate({k: prefill(s) for k, s in sessions.items()}, args.repeats)
    for s in sessions.values():
        s.reset()
        s.step(prompt, last_only=True)
    tok = np.array([[1]])
    dec = alternate({k: (lambda s=s: s.step(tok, last_only=True)) for k, s in sessions.items()}, args.decode, warmup=2)
    speed = {}
    for name, times, n in (("decode", dec, 1), ("prefill", pre, 128)):
        med = {k: statistics.median(v) for k, v in times.items()}
        speed[name] = {f"{k}_tokens_per_s": round(n / t, 2) for k, t in med.items()}
        speed[name]["speedup"] = round(med["fp32"] / med["pruned"], 3)
    res["compiled_speed"] = speed | {"threads": args.threads, "cached_tokens": 128, "libraries": libs}
    print(json.dumps(res["compiled_speed"]), flush=True)  # before the long perplexity runs
    gen = models["pruned"].generate("What is the capital of France?", chat=True, max_new_tokens=16)
    res["generate_pruned"] = gen["text"]
    del models, sessions
    # perplexity (ONNX Runtime, held-out split)
    ppl = {}
    for name, p in [(c, paths[c]) for c in args.criteria] + [("fp32", src)]:
        ppl[name] = round(shiftc.evaluate(p, tokens=args.tokens, window=512, threads=args.threads)["perplexity"], 3)
        print("perplexity", name, ppl[name], flush=True)
    res["perplexity"] = ppl | {"tokens": args.tokens, "window": 512, "split": "wikipedia eval",
                               "recovery": f"LoRA, {args.recover_steps} steps (see recovery)"}
    out["smollm2"] = res


def bench_smollm2_baselines(args, out: dict) -> None:
    """Perplexity of magnitude / activation pruning without recovery (what the LoRA fine-tune starts from)."""
    src = args.smollm2 or os.path.join(args.work, "smollm2.onnx")
    res = {}
    for crit in ("magnitude", "activation"):
        dst = os.path.join(args.work, f"smollm2_prune25_{crit}_norecovery.onnx")
        if not (args.reuse and os.path.exists(dst)):
            _prune(src, dst, PruneConfig(ratio=0.25, criterion=crit, scope=["mlp", "heads"]), args.threads)
        res[crit] = round(shiftc.evaluate(dst, tokens=args.tokens, window=512, threads=args.threads)["perplexity"], 3)
        print("perplexity (no recovery)", crit, res[crit], flush=True)
    out.setdefault("smollm2", {})["perplexity_no_recovery"] = res | {"tokens": args.tokens, "window": 512}


def bench_effnet(args, out: dict) -> None:
    import onnxruntime as ort

    from shiftc.frontend.data import load_images

    src = args.effnet
    if not src:
        src = os.path.join(args.work, "effnet.onnx")
        if not os.path.exists(src):
            shiftc.export("tests.factories:efficientnet_lite0", src)
    res = {"source": src, "ratio": 0.3, "budget": "flops"}
    paths = {}
    for crit in ("activation", "magnitude"):
        dst = os.path.join(args.work, f"effnet_prune30_{crit}.onnx")
        res[crit] = _prune(src, dst, PruneConfig(ratio=0.3, criterion=crit, budget="flops"), args.threads)
        paths[crit] = dst
    images, names = load_images(224)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads

    def top1(p):
        s = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        return np.array([int(s.run(None, {name: images[i:i + 1]})[0].argmax()) for i in range(len(images))])

    ref = top1(src)
    res["top1_agreement"] = {c: round(float((top1(p) == ref).mean()), 3) for c, p in paths.items()}
    res["images"] = names
    libs = {}
    for name, p in (("fp32", src), ("pruned", paths["activation"])):
        libs[name] = os.path.join(args.work, f"effnet_{name}.so")
        shiftc.compile(p, libs[name])
    models = {k: shiftc.load(v, threads=args.threads) for k, v in libs.items()}
    x = [images[:1]]
    times = alternate({k: (lambda m=m: m.run(x)) for k, m in models.items()}, args.repeats * 3, warmup=2)
    med = {k: statistics.median(v) for k, v in times.items()}
    res["compiled_latency_ms"] = {k: round(v * 1e3, 3) for k, v in med.items()} | {
        "speedup": round(med["fp32"] / med["pruned"], 3), "threads": args.threads}
    out["efficientnet_lite0"] = res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", help="exported SmolLM2 .onnx (default: export into --work)")
    ap.add_argument("--effnet", help="exported EfficientNet-Lite0 .onnx (default: export into --work)")
    ap.add_argument("--work", default=work_dir("prune"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--decode", type=int, default=48)
    ap.add_argument("--skip", choices=["smollm2", "effnet"], action="append", default=[])
    ap.add_argument("--criteria", default="lorapr,magnitude,activation", type=lambda s: s.split(","))
    ap.add_argument("--recover-steps", type=int, default=40, help="LoRA fine-tune steps, the same for every criterion")
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--fp32-lib", help="an already compiled unpruned SmolLM2 library")
    ap.add_argument("--reuse", action="store_true", help="reuse pruned models / libraries found in --work")
    ap.add_argument("--baselines", action="store_true",
                    help="also: SmolLM2 perplexity after magnitude / activation pruning without recovery")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "prune.json"))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    out = {}
    if os.path.exists(args.json):  # keep the other model's figures when one is skipped
        out = read_results(args.json)
    out.update({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()})
    for k in ("partial", "note"):
        out.pop(k, None)
    if "effnet" not in args.skip:
        bench_effnet(args, out)
        print(json.dumps(out["efficientnet_lite0"], indent=1), flush=True)
    if "smollm2" not in args.skip:
        bench_smollm2(args, out)
        print(json.dumps(out["smollm2"], indent=1), flush=True)
    if args.baselines:
        bench_smollm2_baselines(args, out)
    write_results(args.json, out)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
