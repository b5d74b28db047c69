"""Latency of a compiled library next to ONNX Runtime, same inputs and thread count.

Runs alternate between the two backends (A B A B ...) so that machine noise hits both alike;
the median of each is reported with the ratio ``ONNX Runtime time / compiled time`` (> 1 means
the compiled library is faster). Causal LMs are measured as

    prefill: one forward pass over ``prefill`` prompt tokens from an empty cache  -> tokens/s
    decode:  one-token steps with a KV cache after that prompt                     -> tokens/s

Other models run their ``main`` on random inputs; symbolic dimensions take the values of
``--dim NAME=VALUE`` (``batch`` defaults to 1, others to 16).
"""

from __future__ import annotations

import os
import statistics

import numpy as np

from .backend.runtime import Model, load
from .errors import UsageError
from .progress import log
from .timing import alternate


def _reference_for(model: Model, reference: str | None) -> str:
    if reference:
        return reference
    src = model.meta.get("source_path")
    if src and os.path.exists(src):
        return src
    guess = os.path.join(os.path.dirname(model.path), model.meta.get("source", ""))
    if model.meta.get("source") and os.path.exists(guess):
        return guess
    raise UsageError(f"no ONNX reference found for '{model.path}': pass --reference MODEL.onnx")


def random_inputs(model: Model, dims: dict[str, int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in model.inputs:
        shape = []
        for d in spec["shape"] or []:
            if isinstance(d, int):
                shape.append(d)
            elif d in dims:
                shape.append(dims[d])
            else:
                shape.append(1 if d == "batch" else 16)
        dt = np.dtype(spec["dtype"] or "float32")
        if dt.kind == "f":
            arrays.append(rng.standard_normal(shape).astype(dt))
        else:
            arrays.append(rng.integers(0, 2, shape).astype(dt))
    return arrays


def bench(model_path: str, *, vs: str = "onnxruntime", threads: int = 1, reference: str | None = None,
          repeats: int = 10, prefill: int = 128, decode: int = 32, dims: dict[str, int] | None = None) -> dict:
    if vs != "onnxruntime":
        raise UsageError(f"--vs '{vs}' is not supported (choices: onnxruntime)")
    compiled = load(model_path, threads=threads)
    ref = load(_reference_for(compiled, reference), threads=threads)
    result = {"model": model_path, "reference": ref.path, "threads": threads, "vs": vs, "task": compiled.task}
    if compiled.task == "causal-lm":
        result.update(_bench_lm(compiled, ref, repeats, prefill, decode))
    else:
        arrays = random_inputs(compiled, dims or {})
        times = alternate({"compiled": lambda: compiled.run(arrays), "onnxruntime": lambda: ref.run(arrays)}, repeats)
        c, o = statistics.median(times["compiled"]), statistics.median(times["onnxruntime"])
        result.update({"latency_ms": {"compiled": c * 1e3, "onnxruntime": o * 1e3}, "ratio": o / c})
    return result


def _bench_lm(compiled: Model, ref: Model, repeats: int, prefill: int, decode: int) -> dict:
    vocab = compiled.meta["decoder"]["vocab_size"]
    prompt = np.random.default_rng(0).integers(0, vocab, (1, prefill))
    sessions = {"compiled": compiled.lm_session(), "onnxruntime": ref.lm_session()}

    def prefill_fn(s):
        def run():
            s.reset()
            s.step(prompt, last_only=True)
        return run

    log(f"bench: prefill {prefill} tokens x{repeats}")
    pre = alternate({k: prefill_fn(s) for k, s in sessions.items()}, repeats)
    # decode: after the prompt, `decode` one-token steps per backend, interleaved step by step
    for s in sessions.values():
        s.reset()
        s.step(prompt, last_only=True)
    log(f"bench: decode {decode} tokens")
    tok = np.array([[1]])
    dec = alternate({k: (lambda s=s: s.step(tok, last_only=True)) for k, s in sessions.items()}, decode, warmup=2)
    out = {"prefill_tokens": prefill, "decode_tokens": decode}
    for name, times in (("prefill", pre), ("decode", dec)):
        c, o = statistics.median(times["compiled"]), statistics.median(times["onnxruntime"])
        n = prefill if name == "prefill" else 1
        out[name] = {
            "compiled_ms": c * 1e3,
            "onnxruntime_ms": o * 1e3,
            "compiled_tokens_per_s": n / c,
            "onnxruntime_tokens_per_s": n / o,
            "ratio": o / c,
        }
    return out
