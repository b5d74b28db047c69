"""Accuracy of a model (compiled library or ONNX): perplexity on held-out text, top-1 on images.

Top-1: the Fashion-MNIST test set (10,000 images, frontend.data.fashion_mnist_inputs) through an
image classifier taking ``[batch, 1, 28, 28]``; the share of images whose largest logit is the
label. The same images and batches for an .onnx and a compiled library.

Perplexity: the held-out split of the text corpus (see frontend.data: Wikipedia articles whose
crc32(title) % 4 == 0) is tokenized, concatenated with EOS between articles, and cut into
``tokens // window`` non-overlapping windows of ``window`` tokens. Each window is scored from an
empty KV cache in one forward pass; every position but the first predicts the next token:

    PPL = exp( Σ_windows Σ_{t=1}^{W-1} −log p(x_t | x_<t) / (n_windows · (W − 1)) )

Log-probabilities are computed in float64 from the model's float32 logits. The same windows are
used for an .onnx (ONNX Runtime) and a compiled library, so their results are comparable.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .backend.runtime import Model
from .errors import UsageError
from .frontend.data import FASHION_MNIST_SHAPE, fashion_mnist_inputs, texts_for, token_windows
from .progress import Counter
from .tokenizer import tokenizer_for

TASKS = ("perplexity", "top1")


def window_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Sum of −log p(ids[t] | ids[<t]) for t ≥ 1, and the number of predicted tokens."""
    z = logits[:-1].astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=-1))
    target = z[np.arange(len(ids) - 1), ids[1:]]
    return float((lse - target).sum()), len(ids) - 1


def perplexity(model: Model, *, tokens: int = 32768, window: int = 512, corpus: str = "wikipedia",
               split: str | None = None, tokenizer: str | None = None, step: int | None = None, data=None) -> dict:
    """Perplexity over article-disjoint windows. ``step`` feeds each window that many tokens per
    forward call through the KV cache (1: token by token, the decode path's kernels, which on a
    compiled low-bit model are not the prefill's); None: one call per window. ``data``: the user's
    text (a path or strings, frontend.data.load_user_texts) instead of ``corpus``; ``split``
    defaults to eval (a corpus) or all (data)."""
    if model.task != "causal-lm":
        raise UsageError(f"--task perplexity needs a causal LM; '{model.path}' is '{model.task}'")
    if window < 2:
        raise UsageError(f"--window must be >= 2 (got {window})")
    if step is not None and step < 1:
        raise UsageError(f"--step must be >= 1 (got {step})")
    tok = tokenizer_for(model.meta, tokenizer, model.path)
    texts, corpus, split = texts_for(corpus, split, data, corpus_split="eval", flag="--eval-data")
    windows = token_windows(tok, texts, window=window, n_tokens=tokens, what=f"{corpus} ({split})")
    session = model.lm_session(batch=1)
    total_nll, count = 0.0, 0
    progress = Counter(f"perplexity ({model.kind})", len(windows))
    t0 = time.perf_counter()
    for w in windows:
        session.reset()
        if step is None or step >= len(w):
            logits = session.step(w[None])[0]
        else:
            logits = np.concatenate([session.step(w[None, i:i + step])[0] for i in range(0, len(w), step)])
        nll, n = window_nll(logits, w)
        total_nll += nll
        count += n
        progress.update(extra=f"ppl so far {math.exp(total_nll / count):.3f}")
    seconds = time.perf_counter() - t0
    return {
        "task": "perplexity",
        "model": model.path,
        "backend": model.kind,
        "perplexity": math.exp(total_nll / count),
        "mean_nll": total_nll / count,
        "corpus": corpus,
        "split": split,
        "windows": int(len(windows)),
        "window": window,
        "step": step or window,
        "tokens_scored": count,
        "seconds": round(seconds, 2),
    }


def top1(model: Model, *, limit: int | None = None, batch: int = 64) -> dict:
    """Top-1 accuracy on the Fashion-MNIST test set (the first ``limit`` images if given)."""
    if len(model.inputs) != 1:
        raise UsageError(f"--task top1 needs an image classifier with one input; '{model.path}' has "
                         f"{[i['name'] for i in model.inputs]}")
    inp = model.inputs[0]
    shape = inp.get("shape") or []
    if len(shape) != 4 or any(isinstance(d, int) and d != want for d, want in zip(shape[1:], FASHION_MNIST_SHAPE)):
        raise UsageError(f"--task top1 runs Fashion-MNIST ([batch, 1, 28, 28] images); '{model.path}' input "
                         f"'{inp['name']}' has shape {shape}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1 (got {limit})")
    x, y = fashion_mnist_inputs("test", limit)
    rows = shape[0] if isinstance(shape[0], int) else batch  # a static batch is what the model takes
    correct, t0 = 0, time.perf_counter()
    progress = Counter(f"top-1 ({model.kind})", (len(x) + rows - 1) // rows)
    for i in range(0, len(x), rows):
        xb = x[i:i + rows]
        n = len(xb)
        if n < rows and isinstance(shape[0], int):  # the last, short batch of a static-batch model
            xb = np.concatenate([xb, np.zeros((rows - n, *xb.shape[1:]), xb.dtype)])
        logits = next(iter(model.run({inp["name"]: xb}).values()))
        correct += int((np.argmax(logits[:n], axis=-1) == y[i:i + n]).sum())
        progress.update(extra=f"top-1 so far {correct / min(i + rows, len(x)):.4f}")
    return {"task": "top1", "model": model.path, "backend": model.kind, "data": "fashion-mnist (test)",
            "top1": correct / len(x), "images": int(len(x)), "seconds": round(time.perf_counter() - t0, 2)}

