"""Shared fixtures: small models built in the tests, the real SmolLM2, and optional-tool skips.

SHIFTC_REQUIRE_ALL=1 (set by .ci/run) turns every skip for a missing optional tool into a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("SHIFTC_QUIET", "1")
# Compiled libraries and shiftc._native run the AVX2/AVX-512 GEMV of uniform weights on int8 tables by
# default (activations rounded to 8 bits per group: bcq_lut.h). Tests that hold a compiled model to
# ONNX Runtime at float tolerances use the float32 tables; test_lut_kernels and test_uniform check
# the int8 tables against their own error bound and tolerance.
os.environ["SHIFTC_LUT_TABLES"] = "float32"
REQUIRE_ALL = os.environ.get("SHIFTC_REQUIRE_ALL", "") not in ("", "0")


def require(condition: bool, reason: str) -> None:
    """Skip when an optional tool is missing; fail instead under SHIFTC_REQUIRE_ALL=1 (CI)."""
    if not condition:
        if REQUIRE_ALL:
            pytest.fail(f"required in CI but missing: {reason}")
        pytest.skip(reason)


def run_cli(*args: str, check: bool = False, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real ``shiftc`` CLI in a subprocess (stdout/stderr captured as text)."""
    env = dict(os.environ, SHIFTC_QUIET="1")
    proc = subprocess.run([sys.executable, "-m", "shiftc", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"shiftc {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    from shiftc.frontend.data import smollm2_gguf

    return str(smollm2_gguf())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A Llama-style decoder (GQA 4 q heads / 2 kv heads, 2 layers), random weights, SmolLM2's
    vocabulary size so its tokenizer can drive it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir, tmp_path_factory):
    """(onnx path, compiled library path) of the tiny decoder."""
    import shiftc

    d = tmp_path_factory.mktemp("tiny_llama_build")
    onnx_path, lib = str(d / "tiny.onnx"), str(d / "tiny.so")
    shiftc.export(tiny_llama_dir, onnx_path)
    shiftc.compile(onnx_path, lib)
    return onnx_path, lib


@pytest.fixture(scope="session")
def smollm2_build(smollm2_gguf_path, tmp_path_factory):
    """SmolLM2-135M exported and compiled once per session (real weights)."""
    import shiftc

    d = tmp_path_factory.mktemp("smollm2")
    onnx_path, lib = str(d / "smollm2.onnx"), str(d / "smollm2.so")
    shiftc.export(smollm2_gguf_path, onnx_path, max_positions=1024)
    shiftc.compile(onnx_path, lib)
    return onnx_path, lib


def ort_run(onnx_path: str, feeds: dict) -> dict:
    import onnxruntime as ort

    s = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(None, feeds)))


# A compiled decoder with the default float16 KV cache vs ONNX Runtime on the float32 graph: keys
# and values rounded to 11 significant bits (2^-12 relative) before attention reads them
TOL_KV16 = (2e-3, 2e-3)


def assert_close(actual: np.ndarray, expected: np.ndarray, *, rtol: float, atol: float, what: str = "") -> None:
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)
