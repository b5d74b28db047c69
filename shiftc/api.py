"""The Python API. The CLI (shiftc.cli) only parses arguments and calls these functions.

    export(src, output)                     HF folder / GGUF / module:factory / foreign decoder .onnx -> .onnx
    compile(model, output, target="host")   .onnx -> model library (.so)
    package(model, output, target="aarch64") .onnx/.so -> folder for a board (model, runtime, app)
    load(path, threads=None)                .so or .onnx -> runnable (run / lm_session / generate)
    evaluate(path, task="perplexity", ...)  accuracy on held-out data
    bench(path, vs="onnxruntime", ...)      latency next to ONNX Runtime
    inspect(path)                           ops, parameters, bytes by dtype, inputs/outputs
    generate(path, prompt, ...)             text from a causal LM
    serve(path, host=, port=, max_batch=)   OpenAI-compatible HTTP server, concurrent requests batched
    compress(model, output, config=None, recipe=None, **overrides)  .onnx -> compressed .onnx
"""

from __future__ import annotations

import os

from .errors import BadInputError, UsageError


def export(src: str, output: str | os.PathLike, *, task: str | None = None, max_positions: int | None = None,
           config: str | os.PathLike | None = None):
    """``src``: an HF folder, a .gguf file, module:factory, or an .onnx decoder graph from another
    exporter (``config``: its HF config.json or folder, default the one beside it)."""
    from .frontend.export import export as _export

    return _export(src, output, task=task, max_positions=max_positions, config=config)


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
             corpus: str = "wikipedia", split: str | None = None, tokenizer: str | None = None,
             threads: int | None = None, step: int | None = None, data=None, limit: int | None = None) -> dict:
    """Perplexity on the held-out Wikipedia split (``corpus``, ``split``), or on ``data``: the
    user's text, a path (plain text, .jsonl, .parquet) or an iterable of strings. ``task="top1"``:
    an image classifier's top-1 on the Fashion-MNIST test set (the first ``limit`` images)."""
    from .evaluation import TASKS, perplexity

    if task not in TASKS:
        raise UsageError(f"--task '{task}' is not known; choose one of: {', '.join(TASKS)}")
    path = os.fspath(path)
    if path.endswith(".onnx"):
        from .backend.runtime import OnnxModel
        from .frontend.onnx_io import load_model
        from .passes.ops import DOMAIN, dequantized_copy

        from .frontend.foreign import canonical

        proto = canonical(path, load_model(path))
        if any(n.domain == DOMAIN for n in proto.graph.node):
            # a compressed model: ONNX Runtime would inline and constant-fold one function body per
            # layer at session start (SmolLM2-135M shift-add: 20 GB resident); the de-quantized copy
            # computes the same numbers in a fifth of the memory (4.2 GB), and starts faster
            proto = dequantized_copy(proto)
        model = OnnxModel(path, threads, proto=proto)
    else:
        model = load(path, threads).model
    if task == "top1":
        from .evaluation import top1

        return top1(model, limit=limit)
    return perplexity(model, tokens=tokens, window=window, corpus=corpus, split=split, tokenizer=tokenizer, step=step,
                      data=_texts(data))


def _texts(data):
    """A path as a string, other iterables of strings as a list (read more than once)."""
    if data is None or isinstance(data, str):
        return data
    return os.fspath(data) if isinstance(data, os.PathLike) else list(data)


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


def serve(path: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          max_batch: int = 16, max_queue: int = 64, context: int | None = None, tokenizer: str | None = None,
          model_id: str | None = None) -> None:
    """Serve a compiled causal LM over the OpenAI API until interrupted (shiftc/server/app.py)."""
    from .server.app import serve as _serve

    _serve(os.fspath(path), host=host, port=port, threads=threads, max_batch=max_batch, max_queue=max_queue,
           context=context, tokenizer=tokenizer, model_id=model_id)


def compress(model: str | os.PathLike, output: str | os.PathLike, *, config=None,
             recipe: str | os.PathLike | None = None, **overrides) -> dict:
    """Compress an ONNX model; returns the report (per-layer bits, bits per weight, errors, sizes).

    The settings start from ``config`` (a :class:`shiftc.passes.recipe.CompressConfig`), else the
    ``recipe`` YAML file, else the defaults (3-bit shift-add, Wikipedia calibration); then
    ``overrides`` apply: the CLI flags as keywords (``bits=2``, ``group=64``, ``calib="none"``,
    ``prune=0.3``, ``bits_budget=2.5``, ``binarize="fdb"``, ``distill_steps=200``, ...; the full
    list with their meaning: ``shiftc compress --help``) or recipe keys
    (``**{"shiftadd.damp": 0.02}``). The recipe schema and the rules for combining passes are in
    shiftc/passes/recipe.py.
    """
    import copy

    from .passes.compress import compress as _compress
    from .passes.recipe import CompressConfig, apply_overrides, load_recipe, validate

    if config is not None and recipe is not None:
        raise UsageError("give a config or a recipe, not both")
    if config is not None:
        cfg = copy.deepcopy(config)
    else:
        cfg = load_recipe(recipe) if recipe is not None else CompressConfig()
    if "calib_data" in overrides:
        overrides["calib_data"] = _texts(overrides["calib_data"])
    cfg = apply_overrides(cfg, overrides, from_recipe=config is not None or recipe is not None)
    return _compress(model, output, validate(cfg), tools=_tools())


def _tools():
    """The backend and evaluation steps the passes may need (a latency budget compiles and times
    plans; a report scores perplexity), handed in so that the passes import neither."""
    from .backend.compile import compile_model
    from .passes.tools import Tools

    return Tools(compile=compile_model, load=load, evaluate=evaluate)
