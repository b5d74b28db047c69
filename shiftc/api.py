"""The Python API. The CLI (shiftc.cli) only parses arguments and calls these functions.

    export(src, output)                     HF folder / GGUF / module:factory -> .onnx
    compile(model, output, target="host")   .onnx -> model library (.so)
    package(model, output, target="aarch64") .onnx/.so -> folder for a board (model, runtime, app)
    load(path, threads=None)                .so or .onnx -> runnable (run / lm_session / generate)
    evaluate(path, task="perplexity", ...)  accuracy on held-out data
    bench(path, vs="onnxruntime", ...)      latency next to ONNX Runtime
    inspect(path)                           ops, parameters, bytes by dtype, inputs/outputs
    generate(path, prompt, ...)             text from a causal LM
    compress(model, output, bits=3, ...)    .onnx -> compressed .onnx (shift-add: BCQ, 2^e scales)
"""

from __future__ import annotations

import os

from .errors import BadInputError, UsageError


def export(src: str, output: str | os.PathLike, *, task: str | None = None, max_positions: int | None = None):
    from .frontend.export import export as _export

    return _export(src, output, task=task, max_positions=max_positions)


def compile(model, output: str | os.PathLike, *, target: str = "host", arch: str | None = None,  # noqa: A001
            cpu: str | None = None, kv_cache: str = "inplace",
            kv_dtype: str = "float16"):
    from .backend.compile import compile_model

    return compile_model(model, output, target=target, arch=arch, cpu=cpu, kv_cache=kv_cache, kv_dtype=kv_dtype)


def package(model: str | os.PathLike, output: str | os.PathLike, *, target: str = "aarch64", cpu: str | None = None,
            wheels: str | os.PathLike | None = None):
    from .targets.package import package as _package

    return _package(model, output, target=target, cpu=cpu, wheels=wheels)


class Runnable:
    """A loaded model: ``run`` for any task, ``generate`` / ``lm_session`` for causal LMs."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def run(self, feeds):
        return self.model.run(feeds)

    def lm_session(self, batch: int = 1):
        return self.model.lm_session(batch)

    def generate(self, prompt: str, **kwargs) -> dict:
        from .generation import generate as _generate
        from .sampling import Sampler

        sampler_keys = ("greedy", "temperature", "top_k", "top_p", "mirostat_tau", "mirostat_eta", "seed")
        skw = {k: kwargs.pop(k) for k in sampler_keys if k in kwargs}
        sampler = kwargs.pop("sampler", None) or (Sampler(**skw) if skw else Sampler(greedy=True))
        return _generate(self.model, prompt, sampler=sampler, **kwargs)


def load(path: str | os.PathLike, threads: int | None = None) -> Runnable:
    from .backend.runtime import load as _load

    return Runnable(_load(path, threads))


def evaluate(path: str | os.PathLike, *, task: str = "perplexity", tokens: int = 32768, window: int = 512,
             corpus: str = "wikipedia", split: str = "eval", tokenizer: str | None = None, threads: int | None = None,
             step: int | None = None) -> dict:
    from .evaluation import TASKS, perplexity

    if task not in TASKS:
        raise UsageError(f"--task '{task}' is not known; choose one of: {', '.join(TASKS)}")
    path = os.fspath(path)
    if path.endswith(".onnx"):
        from .backend.runtime import OnnxModel
        from .frontend.onnx_io import load_model
        from .passes.ops import DOMAIN, dequantized_copy

        proto = load_model(path)
        if any(n.domain == DOMAIN for n in proto.graph.node):
            # a compressed model: ONNX Runtime would inline and constant-fold one function body per
            # layer at session start (SmolLM2-135M shift-add: 20 GB resident); the de-quantized copy
            # computes the same numbers in a fifth of the memory (4.2 GB), and starts faster
            proto = dequantized_copy(proto)
        model = OnnxModel(path, threads, proto=proto)
    else:
        model = load(path, threads).model
    return perplexity(model, tokens=tokens, window=window, corpus=corpus, split=split, tokenizer=tokenizer, step=step)


def bench(path: str | os.PathLike, *, vs: str = "onnxruntime", threads: int = 1, reference: str | None = None, **kwargs) -> dict:
    from .benchmarking import bench as _bench

    return _bench(os.fspath(path), vs=vs, threads=threads, reference=reference, **kwargs)


def inspect(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if path.endswith(".onnx"):
        from .frontend import metadata as md
        from .frontend.onnx_io import load_model, model_summary

        proto = load_model(path)
        return {"path": path, "kind": "onnx", **md.get_info(proto), **model_summary(proto)}
    if path.endswith(".so"):
        from .backend.runtime import CompiledModel

        m = CompiledModel(path, threads=1)
        return {"path": path, "kind": "library", "size_bytes": os.path.getsize(path), **m.meta}
    raise BadInputError(f"'{path}': expected an .onnx file or a compiled .so library")


def generate(path: str | os.PathLike, prompt: str, *, threads: int | None = None, **kwargs) -> dict:
    return load(path, threads).generate(prompt, **kwargs)


def compress(model: str | os.PathLike, output: str | os.PathLike, *, bits: int | None = None, group: int | None = None,
             scale_mode: str | None = None, act_order: bool | None = None, lm_head: bool | None = None,
             layer_bits: dict | None = None, skip: list | None = None, calib: str | None = None,
             calib_windows: int | None = None, calib_window: int | None = None, tokenizer: str | None = None,
             recipe: str | os.PathLike | None = None, threads: int | None = None, prune: float | None = None,
             prune_criterion: str | None = None, prune_scope: list | str | None = None,
             prune_budget: str | None = None, nm: str | None = None, bits_budget: float | None = None,
             size_budget_mb: float | None = None,
             candidates: list | None = None, sensitivity: str | None = None, tie: bool | None = None,
             latency_budget_ms: float | None = None, latency_margin: float | None = None,
             latency_verify: int | None = None,
             target: str | None = None, mp_cache: str | None = None,
             report: bool | None = None, report_eval_tokens: int | None = None,
             hawq_source: str | None = None, binarize: str | None = None, distill_steps: int | None = None,
             distill_minutes: float | None = None, distill_loss: str | None = None,
             distill_source: str | None = None, distill_norms: bool | None = None,
             distill_planes: bool | None = None, distill_plane_lr: float | None = None, recover_steps: int | None = None,
             recover_minutes: float | None = None) -> dict:
    """Compress an ONNX model with the shift-add pass; arguments given override the recipe file.

    ``calib``: "wikipedia" (default), "lee", or "none" (data-free: plain BCQ, no GPTQ).
    ``prune``: fraction of the prunable parameters (``prune_budget="flops"``: FLOPs) removed by
    structured pruning (``prune_criterion`` activation | magnitude | lorapr, ``prune_scope`` of
    mlp, heads, channels); ``nm``: N:M sparsity such as "2:4". Pruning alone (no shift-add
    argument, no recipe) writes a pruned fp32 model. The report's ``prune`` lists kept units per group.
    ``recover_steps`` / ``recover_minutes``: LoRA fine-tune of the export source's torch model with
    the pruned units masked (recovery; the budget of ``prune_criterion="lorapr"``).
    ``bits_budget``: choose each layer's bits (``candidates``, default [2, 3, 4]) to minimise the
    total ``sensitivity`` ("calib": output error on the calibration data; "hawq": HAWQ-V2 Hessian
    traces through PyTorch, from ``hawq_source`` or the recorded export source) with an average of
    at most ``bits_budget`` stored bits per weight (scales included); ``tie`` gives layers sharing an
    input one width; ``latency_budget_ms`` adds a budget on the measured kernel times (``target``
    "host"; the plan is held to the budget less ``latency_margin``, a fraction, default 0.01, and
    then compiled and measured: over it, the latency model is refitted on that measurement and the
    plan made again, ``latency_verify`` compiled plans at most, default 2);
    ``size_budget_mb`` instead bounds the whole output: the bytes of every initializer (quantized
    layers as stored, the embedding table, norms, rotary frequencies, anything left fp32) at most this many
    megabytes (10^6 bytes); give one of ``bits_budget`` / ``size_budget_mb``.
    ``mp_cache`` keeps per-layer results between runs. Writes OUT.report.json/.html
    (``report=False``: not), with perplexity before/after when ``report_eval_tokens`` > 0.
    ``binarize``: "fdb" (2-bit flexible dual binarization) or "1bit": the binarize pass
    (``ai.shiftc::FdbMatMul``) instead of shift-add; ``group``, ``act_order``, ``lm_head``, ``skip``
    and the calibration arguments apply to it (shiftc/passes/binarize.py). ``distill_steps`` /
    ``distill_minutes`` then fine-tune the scales (binarize: and offsets) of either pass against
    the fp32 PyTorch model (``distill_source``: HF folder or .gguf, default the export source)
    with ``distill_loss`` "kl" (default) or "dad" (entropy-re-weighted KL); shift-add scales stay
    powers of two throughout (straight-through rounding; shiftc/passes/distill.py);
    ``distill_norms`` tunes the RMSNorm gains too; ``distill_planes`` trains the bit planes too
    (quantization-aware: a latent float weight per weight, the nearest code in every forward,
    straight-through gradient, learning rate ``distill_plane_lr``).
    Returns the report (per-layer bits, bits per weight, weight/output errors; sizes).
    """
    from .passes.compress import compress as _compress
    from .passes.recipe import CompressConfig, load_recipe, validate

    cfg = load_recipe(recipe) if recipe is not None else CompressConfig()
    sa_args = (bits, group, scale_mode, act_order, lm_head, layer_bits, skip, bits_budget, size_budget_mb)
    if any(v is not None for v in (prune, prune_criterion, prune_scope, prune_budget, nm, recover_steps,
                                   recover_minutes)):
        from .passes.prune import PruneConfig

        cfg.prune = cfg.prune or PruneConfig(ratio=0.0)
        for key, value in (("ratio", prune), ("criterion", prune_criterion), ("scope", prune_scope),
                           ("budget", prune_budget), ("nm", nm), ("recover_steps", recover_steps),
                           ("recover_minutes", recover_minutes)):
            if value is not None:
                setattr(cfg.prune, key, value)
        if recipe is None and all(v is None for v in sa_args):
            cfg.shiftadd = None  # prune only
    if cfg.shiftadd is None and any(v is not None for v in sa_args):
        from .passes.shiftadd import ShiftAddConfig

        cfg.shiftadd = ShiftAddConfig()
    s, c = cfg.shiftadd, cfg.calib
    for obj, key, value in ((s, "bits", bits), (s, "group", group), (s, "scale_mode", scale_mode),
                            (s, "act_order", act_order), (s, "lm_head", lm_head), (s, "layer_bits", layer_bits),
                            (s, "skip", skip), (c, "corpus", calib), (c, "windows", calib_windows),
                            (c, "window", calib_window), (c, "tokenizer", tokenizer), (cfg, "threads", threads)):
        if value is not None:
            setattr(obj, key, value)
    distill_args = {"steps": distill_steps, "minutes": distill_minutes, "loss": distill_loss, "source": distill_source,
                    "norms": distill_norms, "planes": distill_planes, "plane_lr": distill_plane_lr}
    if binarize is None and cfg.binarize is None and any(v is not None for v in distill_args.values()):
        if cfg.shiftadd is None:
            from .errors import UsageError

            raise UsageError("--distill-steps/--distill-minutes fine-tune the scales of a compressed model: "
                             "add --shiftadd-bits N or --binarize fdb|1bit")
        for key, value in distill_args.items():
            if value is not None:
                setattr(cfg.shiftadd, f"distill_{key}", value)
    if binarize is not None or cfg.binarize is not None:  # the binarize pass instead of shift-add
        from .passes.binarize import apply_args

        apply_args(cfg, binarize, group=group, act_order=act_order, lm_head=lm_head, skip=skip,
                   shiftadd_only={"--shiftadd-bits": bits, "--scale-mode": scale_mode, "layer_bits": layer_bits,
                                  "--bits-budget": bits_budget, "--size-budget-mb": size_budget_mb},
                   distill=distill_args)
    mp = cfg.mixed_precision
    for key, value in (("bits_budget", bits_budget), ("size_budget_mb", size_budget_mb), ("candidates", candidates),
                       ("sensitivity", sensitivity),
                       ("tie", tie), ("latency_budget_ms", latency_budget_ms),
                       ("latency_margin", latency_margin), ("latency_verify", latency_verify), ("target", target),
                       ("cache", mp_cache), ("report", report), ("eval_tokens", report_eval_tokens),
                       ("hawq_source", hawq_source)):
        if value is not None:
            setattr(mp, key, value)
    return _compress(model, output, validate(cfg))
