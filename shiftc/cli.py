"""``shiftc`` command line. Parses arguments and calls shiftc.api; nothing else lives here.

Exit codes: 0 ok, 2 usage error, 3 bad input file, 4 unsupported model/op, 5 run-time input
error, 1 internal error (a bug). Errors go to stderr; ``--json`` prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import EXIT_INTERNAL, ShiftcError, UsageError
from .options import add_arguments, positive


def _existing(path: str) -> str:
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"'{path}' does not exist")
    return path


def _model_file(path: str) -> str:
    path = _existing(path)
    if not path.endswith((".onnx", ".so")):
        raise argparse.ArgumentTypeError(f"'{path}': expected an .onnx file or a compiled .so library")
    return path


def _emit(args, result: dict, text: str) -> None:
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(text)


# -- commands ----------------------------------------------------------------------------------


def cmd_export(args):
    from . import api

    r = api.export(args.src, args.output, task=args.task, max_positions=args.max_positions, config=args.config)
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
                     split=args.split, tokenizer=args.tokenizer, threads=args.threads, step=args.step,
                     data=args.eval_data, limit=args.limit)
    if r["task"] == "top1":
        return _emit(args, r, f"top-1 {r['top1']:.4f} ({r['backend']}, {r['images']} images of {r['data']})")
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


def cmd_serve(args):
    from . import api

    api.serve(args.model, host=args.host, port=args.port, threads=args.threads, max_batch=args.max_batch,
              max_queue=args.max_queue, context=args.context, tokenizer=args.tokenizer, model_id=args.model_name)


def cmd_compress(args):
    from . import api

    import yaml

    from .passes.recipe import compress_options

    overrides = {o.kw: getattr(args, o.kw) for _, _, o in compress_options() if o.flag is not None}
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise UsageError(f"--set '{item}': expected SECTION.KEY=VALUE (a recipe key, e.g. shiftadd.damp=0.02)")
        overrides[key.strip()] = yaml.safe_load(value)
    r = api.compress(args.model, args.output, recipe=args.recipe, **overrides)
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


def add_compress_flags(parser: argparse.ArgumentParser) -> None:
    """The compress flags, generated from the config fields that declare them (shiftc/options.py)."""
    from .passes.recipe import compress_options

    add_arguments(parser, ((f, o) for _, f, o in compress_options()))


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
    sp.add_argument("src", help="HF model folder, .gguf file, module:factory (a callable returning (torch module, example "
                    "inputs)), or an .onnx decoder graph from another exporter (torch.onnx, optimum)")
    sp.add_argument("-o", "--output", required=True, help="output .onnx file")
    sp.add_argument("--task", choices=["causal-lm", "encoder", "image-classification"], help="expected task (checked)")
    sp.add_argument("--max-positions", type=positive, help="causal LMs: longest sequence supported (default: the model's, at most 32768)")
    sp.add_argument("--config", help="an .onnx decoder from another exporter: its Hugging Face config.json or folder "
                    "(default: config.json beside it)")

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
    sp.add_argument("--threads", type=positive)

    sp = command("eval", cmd_eval, "measure accuracy (perplexity on held-out Wikipedia text, top-1 on Fashion-MNIST)")
    sp.add_argument("model", type=_model_file)
    sp.add_argument("--task", default="perplexity", choices=["perplexity", "top1"],
                    help="perplexity (causal LMs) or top1 (image classifiers of [batch, 1, 28, 28]: the Fashion-MNIST "
                         "test set)")
    sp.add_argument("--limit", type=positive, help="top1: the first N test images (default: all 10,000)")
    sp.add_argument("--tokens", type=positive, default=32768, help="token budget (default 32768)")
    sp.add_argument("--window", type=positive, default=512, help="tokens per window (default 512)")
    sp.add_argument("--step", type=positive,
                    help="feed each window this many tokens per call through the KV cache (1: the decode path, "
                         "token by token; default: the whole window in one call)")
    sp.add_argument("--corpus", default="wikipedia", choices=["wikipedia", "lee"])
    sp.add_argument("--split", help="wikipedia: eval (held out, the default) or calib; lee: all; --eval-data: all "
                                    "(the default), or the eval / calib documents of the file")
    sp.add_argument("--eval-data", metavar="PATH", type=_existing,
                    help="your own text instead of --corpus: plain text (documents separated by blank lines), "
                         ".jsonl (a 'text' field per line) or .parquet (a 'text' column)")
    sp.add_argument("--tokenizer", help="HF folder or .gguf (default: the one recorded at export)")
    sp.add_argument("--threads", type=positive)

    sp = command("bench", cmd_bench, "time a compiled library next to ONNX Runtime (same inputs and threads)")
    sp.add_argument("model", type=_model_file, help="compiled .so")
    sp.add_argument("--vs", default="onnxruntime", choices=["onnxruntime"])
    sp.add_argument("--reference", type=_existing, help="the .onnx to compare with (default: the one it was compiled from)")
    sp.add_argument("--threads", type=positive, default=1)
    sp.add_argument("--repeats", type=positive, default=10)
    sp.add_argument("--prefill", type=positive, default=128, help="causal LMs: prompt tokens (default 128)")
    sp.add_argument("--decode", type=positive, default=32, help="causal LMs: decode steps timed (default 32)")

    sp = command("compress", cmd_compress, "compress an ONNX model: shift-add (binary-coded weights, power-of-two scales)")
    sp.add_argument("model", type=_existing, help="input .onnx file")
    sp.add_argument("-o", "--output", required=True, help="output .onnx file")
    sp.add_argument("--recipe", type=_existing, help="YAML recipe (schema: shiftc/passes/recipe.py); flags override it")
    sp.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                    help="set any recipe key (e.g. shiftadd.damp=0.02; the value is read as YAML); repeatable")
    add_compress_flags(sp)

    sp = command("generate", cmd_generate, "generate text with a causal LM")
    sp.add_argument("model", type=_model_file)
    sp.add_argument("--tokenizer", help="HF folder or .gguf (default: the one recorded at export)")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-new-tokens", type=positive, default=64)
    sp.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    sp.add_argument("--sampler", choices=["greedy", "sample"], default="greedy", help="greedy, or sample with --temperature/--top-k/--top-p")
    sp.add_argument("--temperature", type=float, default=1.0)
    sp.add_argument("--top-k", type=positive)
    sp.add_argument("--top-p", type=float)
    sp.add_argument("--mirostat-tau", type=float, help="Mirostat v2 target surprise τ in bits (enables Mirostat)")
    sp.add_argument("--mirostat-eta", type=float, default=0.1, help="Mirostat v2 learning rate η")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=positive)

    sp = command("serve", cmd_serve, "serve a compiled causal LM over an OpenAI-compatible HTTP API "
                 "(/v1/completions, /v1/chat/completions, streaming; concurrent requests decode as one batch)")
    sp.add_argument("model", type=_existing, help="compiled causal-LM library (.so)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--threads", type=positive, help="threads of the compiled library (default: all cores)")
    sp.add_argument("--max-batch", type=positive, default=16, help="requests decoded together (default 16)")
    sp.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting beyond the batch; more get 503 with Retry-After (default 64)")
    sp.add_argument("--context", type=positive, help="most tokens (prompt + generated) per request "
                    "(default: the model's positions)")
    sp.add_argument("--tokenizer", help="HF folder or .gguf (default: the one recorded at export)")
    sp.add_argument("--model-name", help="the model's id in the API (default: the library's file name without .so)")
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
