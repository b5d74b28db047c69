"""Load the tokenizer of a model: from an HF folder, a GGUF file, or what the model records."""

from __future__ import annotations

import functools
import os

from .errors import BadInputError, UsageError


@functools.lru_cache(maxsize=4)
def load_tokenizer(src: str):
    from transformers import AutoTokenizer

    if os.path.isfile(src) and src.lower().endswith(".gguf"):
        folder, kw = os.path.dirname(src) or ".", {"gguf_file": os.path.basename(src)}
    elif os.path.isdir(src):
        folder, kw = src, {}
    else:
        raise BadInputError(f"--tokenizer '{src}' is neither an HF model folder nor a .gguf file")
    try:
        return AutoTokenizer.from_pretrained(folder, **kw)
    except Exception as exc:
        raise BadInputError(f"--tokenizer '{src}': cannot load a tokenizer: {str(exc).strip().splitlines()[0]}") from exc


def tokenizer_for(model_meta: dict, override: str | None, model_path: str):
    src = override or model_meta.get("tokenizer")
    if not src:
        raise UsageError(f"'{model_path}' records no tokenizer; pass --tokenizer SRC (an HF folder or .gguf)")
    return load_tokenizer(src)
