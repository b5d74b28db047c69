"""``shiftc`` command line. Parses arguments and calls shiftc.api; nothing else lives here.

Exit codes: 0 ok, 2 usage error, 3 bad input file, 4 unsupported model/op, 5 run-time input
error, 1 internal error (a bug). Errors go to stderr; ``--json`` prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import EXIT_INTERNAL, EXIT_USAGE, ShiftcError, UsageError


def _existing(path: str) -> str:
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"'{path}' does not exist")
    return path


def _model_file(path: str) -> str:
    path = _existing(path)
    if not path.endswith((".onnx", ".so")):
        raise argparse.ArgumentTypeError(f"'{path}': expected an .onnx file or a compiled .so library")
    return path


def _int_at_least(lo: int):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{value}' is not an integer") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo} (got {n})")
        return n
    return parse


_positive = _int_at_least(1)
_nonnegative = _int_at_least(0)


def _bits(value: str) -> int:
    n = _positive(value) if value.lstrip("-").isdigit() else None
    if n is None or not 1 <= n <= 4:
        raise argparse.ArgumentTypeError(f"must be 1..4 (got {value})")
    return n


def _fraction(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number") from None
    if not 0 <= f < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1) (got {value})")
    return f


def _bits_budget(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number of bits per weight") from None
    if not 1 <= f <= 8:
        raise argparse.ArgumentTypeError(f"must be in [1, 8] bits per weight (got {value})")
    return f


def _megabytes(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number of megabytes") from None
    if not f > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 megabytes (got {value})")
    return f


def _bit_list(value: str) -> list[int]:
    try:
        bits = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a comma-separated list of bit widths") from None
    if not bits or any(not 1 <= b <= 4 for b in bits) or len(set(bits)) != len(bits):
        raise argparse.ArgumentTypeError(f"must be distinct bit widths in 1..4 (got {value})")
    return bits


def _group(value: str) -> int:
    n = _positive(value)
    if n % 32:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 32 (got {n})")
    return n


def _emit(args, result: dict, text: str) -> None:
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(text)


# -- commands ----------------------------------------------------------------------------------


def cmd_export(args):
    from . import api

    r = api.export(args.src, args.output, task=args.task, max_positions=args.max_positions)
    _emit(args, r.to_json(), f"wrote {r.path} ({r.task}, {r.num_nodes} nodes, {r.size_bytes / 1e6:.1f} MB)")


def cmd_compile(args):
    from . import api

    r = api.compile(args.model, args.output, target=args.target, arch=args.arch, cpu=args.cpu, kv_cache=args.kv_cache,
                    kv_dtype=args.kv_dtype)
    _emit(args, r.to_json(), f"wrote {r.path} (target {r.target}, {r.isa}, {r.size_bytes / 1e6:.1f} MB, {r.seconds:.1f}s)")


def cmd_package(args):
    from . import api

    r = api.package(args.model, args.output, target=args.target, cpu=args.cpu, wheels=args.wheels)
    size = r.to_json()["size_bytes"]
    _emit(args, r.to_json(), f"wrote {r.path}/ (target {r.target}: runtime {size['runtime'] / 1e6:.1f} MB + model "
                             f"{size['model'] / 1e6:.1f} MB = {size['total'] / 1e6:.1f} MB, {r.seconds:.1f}s); "
                             f"on the board: ./bin/shiftc_run info model.so (see {r.path}/README.md)")


def cmd_inspect(args):
    from . import api

    r = api.inspect(args.model)
    lines = [f"{r['path']} ({r['kind']}, task {r.get('task', 'custom')})"]
    if r["kind"] == "onnx":
        lines.append(f"  opsets: {r['opset_imports']}  nodes: {r['num_nodes']}  parameters: {r['num_parameters']:,}")
        for dom, ops in r["ops"].items():
            lines.append(f"  ops [{dom}]: " + ", ".join(f"{k}×{v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])))
        lines.append("  bytes by dtype: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in r["bytes_by_dtype"].items()))
    else:
        lines.append(f"  target {r['target_name']} ({r['isa']}), {r['size_bytes'] / 1e6:.1f} MB, from {r.get('source')}")
    for kind in ("inputs", "outputs"):
        sig = r[kind]
        shown = sig if len(sig) <= 8 else sig[:6]
        lines.append(f"  {kind}:")
        lines += [f"    {s['name']}: {s['dtype']} {s['shape']}" for s in shown]
        if len(sig) > len(shown):
            lines.append(f"    ... {len(sig) - len(shown)} more")
    _emit(args, r, "\n".join(lines))


def cmd_run(args):
    import numpy as np

    from . import api

    m = api.load(args.model, threads=args.threads)
    if args.inputs:
        data = np.load(args.inputs)
        feeds = {k: data[k] for k in data.files}
    else:
        from .benchmarking import random_inputs

        feeds = dict(zip([i["name"] for i in m.inputs], random_inputs(m.model, {})))
    outs = m.run(feeds)
    if args.output:
        from .frontend.onnx_io import atomic_output

        with atomic_output(args.output) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **outs)
    summary = {k: {"shape": list(v.shape), "dtype": str(v.dtype), "mean": float(np.mean(v)) if v.size else None} for k, v in outs.items()}
    _emit(args, {"outputs": summary, "saved": args.output}, "\n".join(f"{k}: {v['dtype']} {v['shape']} mean {v['mean']:.6g}" for k, v in summary.items()))


def cmd_eval(args):
    from . import api

    r = api.evaluate(args.model, task=args.task, tokens=args.tokens, window=args.window, corpus=args.corpus,
                     split=args.split, tokenizer=args.tokenizer, threads=args.threads, step=args.step)
    steps = f", {r['step']} per step" if r["step"] != r["window"] else ""
    _emit(args, r, f"perplexity {r['perplexity']:.4f} ({r['backend']}, {r['tokens_scored']} tokens in {r['windows']} windows of {r['window']}{steps}, {r['corpus']}/{r['split']})")


def cmd_bench(args):
    from . import api

    r = api.bench(args.model, vs=args.vs, threads=args.threads, reference=args.reference, repeats=args.repeats,
                  prefill=args.prefill, decode=args.decode)
    if r["task"] == "causal-lm":
        rows = [f"{'':8} {'compiled':>14} {'onnxruntime':>14} {'ratio':>7}   (threads {r['threads']})"]
        for k in ("prefill", "decode"):
            v = r[k]
            rows.append(f"{k:8} {v['compiled_tokens_per_s']:>10.1f} t/s {v['onnxruntime_tokens_per_s']:>10.1f} t/s {v['ratio']:>7.2f}")
        text = "\n".join(rows)
    else:
        v = r["latency_ms"]
        text = f"latency: compiled {v['compiled']:.3f} ms, onnxruntime {v['onnxruntime']:.3f} ms, ratio {r['ratio']:.2f} (threads {r['threads']})"
    _emit(args, r, text)


def cmd_generate(args):
    from . import api

    stream = None if args.json else (lambda s: print(s, end="", flush=True))
    kw = dict(max_new_tokens=args.max_new_tokens, tokenizer=args.tokenizer, chat=args.chat, seed=args.seed, on_text=stream)
    if args.mirostat_tau is not None:
        kw.update(mirostat_tau=args.mirostat_tau, mirostat_eta=args.mirostat_eta, temperature=args.temperature)
    elif args.sampler == "greedy":
        kw.update(greedy=True)
    else:
        kw.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    r = api.generate(args.model, args.prompt, threads=args.threads, **kw)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        dec = r["decode_tokens_per_s"]
        print(f"\n[{r['new_tokens']} tokens; prefill {r['prefill_tokens_per_s']:.1f} t/s, decode {dec:.1f} t/s]" if dec else "", file=sys.stderr)


def cmd_compress(args):
    from . import api

    r = api.compress(args.model, args.output, bits=args.shiftadd_bits, group=args.group, scale_mode=args.scale_mode,
                     act_order=args.act_order, lm_head=args.shiftadd_lm_head, calib=args.calib,
                     calib_windows=args.calib_windows, calib_window=args.calib_window, tokenizer=args.tokenizer,
                     recipe=args.recipe, threads=args.threads, prune=args.prune, prune_criterion=args.prune_criterion,
                     prune_scope=args.prune_scope, prune_budget=args.prune_budget, nm=args.nm,
                     bits_budget=args.bits_budget, size_budget_mb=args.size_budget_mb,
                     candidates=args.mp_candidates, sensitivity=args.sensitivity,
                     tie=args.mp_tie or None, latency_budget_ms=args.latency_budget_ms,
                     latency_margin=args.latency_margin, latency_verify=args.latency_verify,
                     target=args.target,
                     mp_cache=args.mp_cache, report=args.report, report_eval_tokens=args.report_eval_tokens,
                     hawq_source=args.hawq_source, binarize=args.binarize, distill_steps=args.distill_steps,
                     distill_minutes=args.distill_minutes, distill_loss=args.distill_loss,
                     distill_source=args.distill_source, distill_norms=args.distill_norms,
                     distill_planes=args.distill_planes, distill_plane_lr=args.distill_plane_lr, recover_steps=args.recover_steps,
                     recover_minutes=args.recover_minutes)
    if "layers" not in r:  # pruning only
        from .passes.prune.prune import summary

        _emit(args, r, summary(r["prune"]) + f"\nwrote {r['path']} ({r['size_bytes'] / 1e6:.1f} MB from "
                       f"{r['source_size_bytes'] / 1e6:.1f} MB, {r['seconds']:.1f}s)")
        return
    if r.get("pass") == "binarize":
        _emit(args, r, f"wrote {r['path']} ({len(r['layers'])} layers binarized ({r['mode']}), "
                       f"{r['bits_per_weight']:.3f} bits/weight, {r['size_bytes'] / 1e6:.1f} MB from "
                       f"{r['source_size_bytes'] / 1e6:.1f} MB, {r['seconds']:.1f}s)")
        return
    mp = r.get("mixed_precision")
    extra = ""
    if mp:
        widths = sorted({e["bits"] for e in r["layers"].values()})
        counts = ", ".join(f"{b}-bit x{sum(1 for e in r['layers'].values() if e['bits'] == b)}" for b in widths)
        budget = f"{mp['size_budget_mb']:g} MB" if mp.get("size_budget_mb") is not None else f"{mp['bits_budget']:g}"
        extra = f"\nmixed precision ({mp['kind']}): budget {budget} -> {counts}"
        if (mp.get("size") or {}).get("realised_bytes") is not None:
            extra += f" ({mp['size']['realised_bytes'] / 1e6:.3f} MB of weights)"
        if mp.get("report"):
            extra += f"\nreport: {mp['report']['html']}"
    _emit(args, r, f"wrote {r['path']} ({len(r['layers'])} layers shift-add, {r['bits_per_weight']:.3f} bits/weight, "
                   f"{r['size_bytes'] / 1e6:.1f} MB from {r['source_size_bytes'] / 1e6:.1f} MB, {r['seconds']:.1f}s)" + extra)


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .targets import target_names
    from .targets.package import PACKAGE_TARGETS

    p = argparse.ArgumentParser(prog="shiftc", description="Compile trained neural networks into small, fast native libraries.")
    p.add_argument("--version", action="version", version=f"shiftc {__import__('shiftc').__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, fn, help_):
        # no prefix matching: `--bits 3` must not silently mean --bits-budget 3
        sp = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False)
        sp.add_argument("--json", action="store_true", help="print a machine-readable JSON result on stdout")
        sp.set_defaults(fn=fn)
        return sp

    sp = command("export", cmd_export, "export a Hugging Face folder, a GGUF file or module:factory to ONNX")
    sp.add_argument("src", help="HF model folder, .gguf file, or module:factory (a callable returning (torch module, example inputs))")
    sp.add_argument("-o", "--output", required=True, help="output .onnx file")
    sp.add_argument("--task", choices=["causal-lm", "encoder", "image-classification"], help="expected task (checked)")
    sp.add_argument("--max-positions", type=_positive, help="causal LMs: longest sequence supported (default: the model's, at most 32768)")

    sp = command("inspect", cmd_inspect, "show ops, parameters, bytes by dtype, inputs and outputs")
    sp.add_argument("model", type=_model_file, help=".onnx file or compiled .so")

    sp = command("compile", cmd_compile, "compile an ONNX model into a native model library")
    sp.add_argument("model", type=_existing, help="input .onnx file")
    sp.add_argument("-o", "--output", required=True, help="output model library (.so)")
    sp.add_argument("--target", default="host", choices=target_names(), help="target machine (default: this one)")
    sp.add_argument("--arch", help="GPU architecture for --target cuda (sm_80, sm_90, ...; default sm_80)")
    sp.add_argument("--cpu", help="Arm core for --target aarch64 (cortex-a53, cortex-a72, cortex-a76, ...)")
    sp.add_argument("--kv-cache", default="inplace", choices=["inplace", "concat"],
                    help="causal LMs on CPU targets: attention on caches each step writes into (inplace, default) "
                         "or the graph's past/present tensors as exported (concat)")
    sp.add_argument("--kv-dtype", default="float16", choices=["float16", "float32"],
                    help="element type of the in-place caches (default float16: half the bytes per step at long "
                         "context; attention arithmetic stays float32)")

    sp = command("package", cmd_package, "package a model for a board: model library, TVM and C++ runtime, example app, README")
    sp.add_argument("model", type=_model_file, help=".onnx (compiled for the target) or a library already compiled for it")
    sp.add_argument("-o", "--output", required=True, help="output folder (an earlier package there is replaced)")
    sp.add_argument("--target", default="aarch64", choices=PACKAGE_TARGETS, help="board (default aarch64: 64-bit Arm Linux)")
    sp.add_argument("--cpu", help="Arm core to tune the model for (cortex-a53, cortex-a72, cortex-a76, ...)")
    sp.add_argument("--wheels", type=_existing, help="folder with the aarch64 apache-tvm and apache-tvm-ffi wheels "
                    "(offline use; default: $SHIFTC_WHEELS, else pip download into ~/.cache/shiftc/wheels)")

    sp = command("run", cmd_run, "run a model once on inputs from an .npz file (random inputs if omitted)")
    sp.add_argument("model", type=_model_file)
    sp.add_argument("--inputs", type=_existing, help=".npz with one array per model input")
    sp.add_argument("-o", "--output", help="write the outputs to this .npz")
    sp.add_argument("--threads", type=_positive)

    sp = command("eval", cmd_eval, "measure accuracy (perplexity on held-out Wikipedia text)")
    sp.add_argument("model", type=_model_file)
    sp.add_argument("--task", default="perplexity", choices=["perplexity"])
    sp.add_argument("--tokens", type=_positive, default=32768, help="token budget (default 32768)")
    sp.add_argument("--window", type=_positive, default=512, help="tokens per window (default 512)")
    sp.add_argument("--step", type=_positive,
                    help="feed each window this many tokens per call through the KV cache (1: the decode path, "
                         "token by token; default: the whole window in one call)")
    sp.add_argument("--corpus", default="wikipedia", choices=["wikipedia", "lee"])
    sp.add_argument("--split", default="eval", help="wikipedia: eval (held out) or calib; lee: all")
    sp.add_argument("--tokenizer", help="HF folder or .gguf (default: the one recorded at export)")
    sp.add_argument("--threads", type=_positive)

    sp = command("bench", cmd_bench, "time a compiled library next to ONNX Runtime (same inputs and threads)")
    sp.add_argument("model", type=_model_file, help="compiled .so")
    sp.add_argument("--vs", default="onnxruntime", choices=["onnxruntime"])
    sp.add_argument("--reference", type=_existing, help="the .onnx to compare with (default: the one it was compiled from)")
    sp.add_argument("--threads", type=_positive, default=1)
    sp.add_argument("--repeats", type=_positive, default=10)
    sp.add_argument("--prefill", type=_positive, default=128, help="causal LMs: prompt tokens (default 128)")
    sp.add_argument("--decode", type=_positive, default=32, help="causal LMs: decode steps timed (default 32)")

    sp = command("compress", cmd_compress, "compress an ONNX model: shift-add (binary-coded weights, power-of-two scales)")
    sp.add_argument("model", type=_existing, help="input .onnx file")
    sp.add_argument("-o", "--output", required=True, help="output .onnx file")
    sp.add_argument("--recipe", type=_existing, help="YAML recipe (schema: shiftc/passes/recipe.py); flags override it")
    sp.add_argument("--shiftadd-bits", type=_bits, help="bit planes per weight, 1..4 (default 3)")
    sp.add_argument("--group", type=_group, help="input columns per scale, a multiple of 32 (default 128)")
    sp.add_argument("--scale-mode", choices=["pow2", "pow2x2", "uniform"],
                    help="scale = 2^e or 2^e1 + 2^e2 (BCQ; default pow2x2), or uniform: a q-bit grid per group "
                         "with a float16 scale and min, its planes a shift apart")
    sp.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                    help="GPTQ: quantize columns by decreasing activation energy (shift-add default: on)")
    sp.add_argument("--shiftadd-lm-head", action=argparse.BooleanOptionalAction, default=None,
                    help="quantize the LM head too (default on)")
    sp.add_argument("--binarize", choices=["fdb", "1bit"],
                    help="binarize instead of shift-add: fdb = 2 {0,1} planes with float16 scales + offset "
                         "(flexible dual binarization), 1bit = one sign plane with scale + mean")
    sp.add_argument("--distill-steps", type=_positive, metavar="N",
                    help="after shift-add or --binarize: fine-tune the scales (binarize: and offsets) against the "
                         "fp32 PyTorch model for N steps (shift-add scales stay powers of two)")
    sp.add_argument("--distill-minutes", type=float, metavar="MIN",
                    help="distillation time bound; the learning rate decays over it (or over --distill-steps if they run out first)")
    sp.add_argument("--distill-loss", choices=["kl", "dad"],
                    help="kl: plain KL to the fp32 model (default); dad: KL re-weighted per token by the "
                         "teacher-student cross-entropy H(p, q)")
    sp.add_argument("--distill-source", help="HF folder or .gguf of the fp32 model (default: the export source)")
    sp.add_argument("--distill-norms", action=argparse.BooleanOptionalAction, default=None,
                    help="also tune the RMSNorm gains during distillation (default off)")
    sp.add_argument("--distill-planes", action=argparse.BooleanOptionalAction, default=None,
                    help="also train the bit planes during distillation (quantization-aware training: a latent "
                         "float weight per weight, nearest code in each forward; default off)")
    sp.add_argument("--distill-plane-lr", type=float, metavar="LR",
                    help="learning rate of the latent weights with --distill-planes (default 3e-4)")
    sp.add_argument("--prune", type=_fraction, metavar="RATIO",
                    help="structured pruning: fraction of the prunable parameters removed (channels, KV groups)")
    sp.add_argument("--prune-criterion", choices=["activation", "magnitude", "lorapr"],
                    help="unit importance: |W|·‖x‖ from calibration (default), |W|², or LoRAPrune scores")
    sp.add_argument("--prune-scope", metavar="mlp,heads,channels", help="what may be pruned (default all three)")
    sp.add_argument("--prune-budget", choices=["params", "flops"], help="what RATIO counts (default params)")
    sp.add_argument("--nm", metavar="N:M", help="N:M semi-structured sparsity after pruning (2:4, 4:8)")
    sp.add_argument("--recover-steps", type=int, metavar="S",
                    help="with --prune: LoRA fine-tune of the export source's torch model, S steps, pruned units "
                         "masked (recovery; the budget of --prune-criterion lorapr)")
    sp.add_argument("--recover-minutes", type=float, metavar="M", help="with --prune: LoRA fine-tune time bound")
    sp.add_argument("--bits-budget", type=_bits_budget, metavar="BITS",
                    help="mixed precision: per-layer bits minimising sensitivity with this average of stored bits "
                         "per weight (scales included), e.g. 2.5; writes OUT.report.json/.html")
    sp.add_argument("--size-budget-mb", type=_megabytes, metavar="MB",
                    help="mixed precision: per-layer bits minimising sensitivity with the output's weights (every "
                         "initializer: quantized layers, embedding table, norms, fp32 leftovers) at most MB x 10^6 "
                         "bytes; instead of --bits-budget")
    sp.add_argument("--mp-candidates", type=_bit_list, metavar="2,3,4", help="bit widths to choose from (default 2,3,4)")
    sp.add_argument("--sensitivity", choices=["calib", "kl", "hawq"],
                    help="calib: layer output error on the calibration data (default); kl: the model's output KL with "
                         "each layer alone quantized (ONNX Runtime); hawq: HAWQ-V2 Hessian traces (PyTorch)")
    sp.add_argument("--mp-tie", action="store_true", help="layers sharing an input (q/k/v; gate/up) get one width")
    sp.add_argument("--latency-budget-ms", type=float, metavar="MS",
                    help="also bound the quantized layers' kernel time, measured per shape with the LUT kernels")
    sp.add_argument("--latency-margin", type=float, metavar="FRACTION",
                    help="plan against --latency-budget-ms x (1 - FRACTION), room for the latency model's error "
                         "(default 0.01)")
    sp.add_argument("--latency-verify", type=_nonnegative, metavar="N",
                    help="with --latency-budget-ms: compile the plan and measure it beside the calibration plans; "
                         "while it measures over budget, refit the latency model on those timings and plan again, "
                         "N compiled plans at most (default 2; 0: trust the prediction)")
    sp.add_argument("--target", help="where --latency-budget-ms is measured (host only for now)")
    sp.add_argument("--mp-cache", metavar="DIR", help="keep per-layer quantized results here between runs")
    sp.add_argument("--report", action=argparse.BooleanOptionalAction, default=None,
                    help="write OUT.report.json/.html with --bits-budget (default on)")
    sp.add_argument("--report-eval-tokens", type=_positive, metavar="N",
                    help="report perplexity before/after on N held-out tokens (ONNX Runtime)")
    sp.add_argument("--hawq-source", help="HF folder or .gguf of the PyTorch model for --sensitivity hawq "
                                          "(default: the source recorded at export)")
    sp.add_argument("--calib", choices=["wikipedia", "lee", "none"], help="calibration text (default wikipedia; none: data-free)")
    sp.add_argument("--calib-windows", type=_positive, help="calibration windows (default 16)")
    sp.add_argument("--calib-window", type=_positive, help="tokens per calibration window (default 256)")
    sp.add_argument("--tokenizer", help="HF folder or .gguf (default: the one recorded at export)")
    sp.add_argument("--threads", type=_positive)

    sp = command("generate", cmd_generate, "generate text with a causal LM")
    sp.add_argument("model", type=_model_file)
    sp.add_argument("--tokenizer", help="HF folder or .gguf (default: the one recorded at export)")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-new-tokens", type=_positive, default=64)
    sp.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    sp.add_argument("--sampler", choices=["greedy", "sample"], default="greedy", help="greedy, or sample with --temperature/--top-k/--top-p")
    sp.add_argument("--temperature", type=float, default=1.0)
    sp.add_argument("--top-k", type=_positive)
    sp.add_argument("--top-p", type=float)
    sp.add_argument("--mirostat-tau", type=float, help="Mirostat v2 target surprise τ in bits (enables Mirostat)")
    sp.add_argument("--mirostat-eta", type=float, default=0.1, help="Mirostat v2 learning rate η")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=_positive)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.fn(args)
        return 0
    except ShiftcError as exc:
        print(f"shiftc {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"shiftc {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so, keep the traceback for the report
        import traceback

        traceback.print_exc()
        print(f"shiftc {args.command}: internal error: {exc!r} (please report this)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
