"""The Python API keeps its shape however often it is used (no submodule shadows a function)."""

from __future__ import annotations

import numpy as np

import shiftc


def test_api_names_stay_functions(tiny_llama, smollm2_gguf_path):
    onnx_path, lib = tiny_llama
    for _ in range(2):
        r = shiftc.evaluate(lib, tokens=256, window=128, tokenizer=smollm2_gguf_path)
        assert r["tokens_scored"] == 2 * 127
        g = shiftc.generate(lib, "Hello", max_new_tokens=2, tokenizer=smollm2_gguf_path)
        assert 1 <= g["new_tokens"] <= 2
    b = shiftc.bench(lib, threads=1, repeats=1, prefill=8, decode=2)
    assert b["decode"]["compiled_tokens_per_s"] > 0
    for name in shiftc.__all__:
        if name not in ("ShiftcError", "__version__"):
            assert callable(getattr(shiftc, name)), name
    info = shiftc.inspect(lib)
    assert info["task"] == "causal-lm" and info["inputs"][0]["name"] == "input_ids"
    assert isinstance(shiftc.load(onnx_path).lm_session().step(np.array([[1, 2]])), np.ndarray)
