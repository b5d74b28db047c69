"""The Python API keeps its shape however often it is used (no submodule shadows a function)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import shiftc

REL_PPL = 1e-5  # float32 summation order differs between the function bodies and the de-quantized MatMuls


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


def test_evaluate_runs_a_compressed_onnx_through_its_dequantized_copy(tiny_llama, smollm2_gguf_path, tmp_path,
                                                                     monkeypatch):
    """api.evaluate on an .onnx with ai.shiftc ops scores the de-quantized copy (ONNX Runtime would
    otherwise constant-fold one function body per layer: 20 GB for SmolLM2-135M): the same
    perplexity as ONNX Runtime running the function bodies, to float rounding."""
    from shiftc.backend.runtime import OnnxModel
    from shiftc.evaluation import perplexity

    onnx_path, _ = tiny_llama
    out = str(tmp_path / "sa2.onnx")
    shiftc.compress(onnx_path, out, bits=2, group=32, calib="none", threads=1)
    from shiftc.passes import ops

    copies = []
    real = ops.dequantized_copy
    monkeypatch.setattr(ops, "dequantized_copy", lambda m, *a, **k: copies.append(1) or real(m, *a, **k))
    got = shiftc.evaluate(out, tokens=256, window=128, tokenizer=smollm2_gguf_path, threads=1)
    assert copies == [1]
    fp32 = shiftc.evaluate(onnx_path, tokens=256, window=128, tokenizer=smollm2_gguf_path, threads=1)
    assert copies == [1]  # an fp32 model is run as it is
    bodies = perplexity(OnnxModel(out, 1), tokens=256, window=128, tokenizer=smollm2_gguf_path)
    assert got["tokens_scored"] == bodies["tokens_scored"] == 2 * 127
    assert got["perplexity"] == pytest.approx(bodies["perplexity"], rel=REL_PPL)
    # the mixed-precision report's before/after perplexity goes through the same path
    from shiftc.passes.mixed_precision.plan import measure_perplexity

    rep = measure_perplexity(onnx_path, out, 256, 128, threads=1, tokenizer=smollm2_gguf_path, evaluate=shiftc.evaluate)
    assert copies == [1, 1] and rep["tokens"] == 2 * 127
    assert rep["before"] == fp32["perplexity"] and rep["after"] == pytest.approx(bodies["perplexity"], rel=REL_PPL)



def test_export_compile_compress_report_their_peak_memory(tmp_path):
    """--json of export, compile and compress carries the process's peak resident memory (a CLI
    command is one process: that command's peak), at least what the interpreter and the model
    take."""
    from conftest import run_cli

    onnx_path, lib, small = (str(tmp_path / f) for f in ("m.onnx", "m.so", "s.onnx"))
    for args in (("export", "tests.factories:mlp", "-o", onnx_path), ("compile", onnx_path, "-o", lib),
                 ("compress", onnx_path, "-o", small, "--prune", "0.25", "--prune-criterion", "magnitude")):
        r = run_cli(*args, "--json", check=True)
        peak = json.loads(r.stdout)["peak_rss_bytes"]
        assert isinstance(peak, int) and 50e6 < peak < 8e9, (args[0], peak)
