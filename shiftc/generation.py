"""Text generation with a causal LM: prefill the prompt, then decode token by token with the KV
cache, choosing each token with a :class:`shiftc.sampling.Sampler`."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .backend.runtime import Model
from .errors import UsageError
from .sampling import Sampler
from .tokenizer import tokenizer_for


def generate(model: Model, prompt: str, *, max_new_tokens: int = 64, tokenizer: str | None = None,
             chat: bool = False, sampler: Sampler | None = None, stop_at_eos: bool = True,
             on_text: Callable[[str], None] | None = None) -> dict:
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    tok = tokenizer_for(model.meta, tokenizer, model.path)
    sampler = sampler or Sampler(greedy=True)
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UsageError("--prompt is empty after tokenization")
    session = model.lm_session(batch=1)
    eos = session.eos | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    t0 = time.perf_counter()
    logits = session.step(np.asarray([ids]), last_only=True)[0]
    t_prefill = time.perf_counter() - t0
    out: list[int] = []
    printed = ""
    t1 = time.perf_counter()
    for _ in range(max_new_tokens):
        nxt = sampler.sample(logits)
        out.append(nxt)
        if on_text is not None:
            text = tok.decode(out, skip_special_tokens=True)
            on_text(text[len(printed):])
            printed = text
        if stop_at_eos and nxt in eos:
            break
        if len(out) == max_new_tokens:
            break
        logits = session.step(np.asarray([[nxt]]), last_only=True)[0]
    t_decode = time.perf_counter() - t1
    n_decoded = max(len(out) - 1, 0)  # the first token comes from the prefill logits
    return {
        "prompt_tokens": len(ids),
        "new_tokens": len(out),
        "token_ids": out,
        "text": tok.decode(out, skip_special_tokens=True),
        "prefill_tokens_per_s": len(ids) / t_prefill if t_prefill > 0 else None,
        "decode_tokens_per_s": n_decoded / t_decode if n_decoded and t_decode > 0 else None,
        "backend": model.kind,
    }
