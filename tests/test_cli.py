"""The CLI end to end on small models: every command, --json, exit codes, errors on stderr."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import run_cli
from shiftc.errors import EXIT_BAD_INPUT, EXIT_RUNTIME, EXIT_UNSUPPORTED, EXIT_USAGE

TOL_PPL_REL = 5e-3  # compiled vs ONNX Runtime perplexity, relative (the 0.5%)


@pytest.mark.parametrize("command", ["export", "inspect", "compile", "run", "eval", "bench", "generate"])
def test_help(command):
    r = run_cli(command, "--help")
    assert r.returncode == 0 and "usage: shiftc " + command in r.stdout


def test_mlp_pipeline_json(tmp_path):
    onnx_path, lib = str(tmp_path / "m.onnx"), str(tmp_path / "m.so")
    r = run_cli("export", "tests.factories:mlp", "-o", onnx_path, "--json", check=True)
    assert json.loads(r.stdout)["path"] == onnx_path
    info = json.loads(run_cli("inspect", onnx_path, "--json", check=True).stdout)
    assert info["ops"]["ai.onnx"]["Gemm"] == 3
    # three layers plus the 3 scalar constants of the exact GELU (sqrt 2, 1, 0.5)
    assert info["num_parameters"] == 32 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10 + 3
    assert info["bytes_by_dtype"]["float32"] == 4 * info["num_parameters"]
    assert info["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 32]}]
    c = json.loads(run_cli("compile", onnx_path, "-o", lib, "--target", "host", "--json", check=True).stdout)
    assert c["size_bytes"] == os.path.getsize(lib)
    lib_info = json.loads(run_cli("inspect", lib, "--json", check=True).stdout)
    assert lib_info["kind"] == "library" and lib_info["inputs"] == info["inputs"]
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    run_cli("run", lib, "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz"), check=True)
    run_cli("run", onnx_path, "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "ref.npz"), check=True)
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["output"], np.load(tmp_path / "ref.npz")["output"], rtol=1e-5, atol=1e-5)
    b = json.loads(run_cli("bench", lib, "--threads", "1", "--repeats", "3", "--json", check=True).stdout)
    assert b["ratio"] > 0 and b["latency_ms"]["compiled"] > 0


def test_decoder_eval_bench_generate(tiny_llama, smollm2_gguf_path):
    onnx_path, lib = tiny_llama
    args = ["--tokens", "512", "--window", "128", "--tokenizer", smollm2_gguf_path, "--json"]
    ref = json.loads(run_cli("eval", onnx_path, *args, check=True).stdout)
    got = json.loads(run_cli("eval", lib, *args, check=True).stdout)
    assert ref["tokens_scored"] == got["tokens_scored"] == 4 * 127
    assert abs(got["perplexity"] - ref["perplexity"]) / ref["perplexity"] < TOL_PPL_REL
    # random weights over a 49152 vocabulary: perplexity is near the vocabulary size
    assert 1000 < ref["perplexity"] < 200000
    b = json.loads(run_cli("bench", lib, "--threads", "1", "--repeats", "2", "--prefill", "16", "--decode", "4", "--json", check=True).stdout)
    assert b["prefill"]["compiled_tokens_per_s"] > 0 and b["decode"]["ratio"] > 0
    outs = []
    for _ in range(2):
        g = json.loads(run_cli("generate", lib, "--tokenizer", smollm2_gguf_path, "--prompt", "The capital of France",
                               "--max-new-tokens", "6", "--sampler", "sample", "--top-k", "40", "--top-p", "0.9",
                               "--temperature", "0.8", "--seed", "3", "--json", check=True).stdout)
        outs.append(g["token_ids"])
    assert outs[0] == outs[1] and len(outs[0]) >= 1  # seeded
    m = json.loads(run_cli("generate", lib, "--tokenizer", smollm2_gguf_path, "--prompt", "Hello", "--max-new-tokens", "5",
                           "--mirostat-tau", "5.0", "--mirostat-eta", "0.1", "--json", check=True).stdout)
    assert 1 <= m["new_tokens"] <= 5
    gr = json.loads(run_cli("generate", onnx_path, "--tokenizer", smollm2_gguf_path, "--prompt", "Hello", "--max-new-tokens", "5", "--json", check=True).stdout)
    gc = json.loads(run_cli("generate", lib, "--tokenizer", smollm2_gguf_path, "--prompt", "Hello", "--max-new-tokens", "5", "--json", check=True).stdout)
    assert gr["token_ids"] == gc["token_ids"]  # greedy: compiled and reference agree


# -- bad input --------------------------------------------------------------------------------


def _model_with_unsupported_ops(path):
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="ok_relu"),
        helper.make_node("FancyOp", ["a"], ["b"], name="fancy_1", domain="com.example"),
        helper.make_node("OtherOp", ["b"], ["y"], name="other_2", domain="com.example"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(m, path)


def test_unsupported_ops_listed_at_once(tmp_path):
    src, out = str(tmp_path / "bad.onnx"), str(tmp_path / "bad.so")
    _model_with_unsupported_ops(src)
    r = run_cli("compile", src, "-o", out)
    assert r.returncode == EXIT_UNSUPPORTED
    assert "fancy_1" in r.stderr and "other_2" in r.stderr and "com.example::FancyOp" in r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(out) and os.listdir(tmp_path) == ["bad.onnx"]


def test_truncated_onnx_no_output(tmp_path):
    run_cli("export", "tests.factories:mlp", "-o", str(tmp_path / "m.onnx"), check=True)
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    r = run_cli("compile", str(tmp_path / "cut.onnx"), "-o", str(tmp_path / "cut.so"))
    assert r.returncode == EXIT_BAD_INPUT and "cut.onnx" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "cut.so").exists()
    assert sorted(os.listdir(tmp_path)) == ["cut.onnx", "m.onnx"]


def test_wrong_input_shape_and_dtype(tmp_path):
    onnx_path, lib = str(tmp_path / "m.onnx"), str(tmp_path / "m.so")
    run_cli("export", "tests.factories:mlp", "-o", onnx_path, check=True)
    run_cli("compile", onnx_path, "-o", lib, check=True)
    np.savez(tmp_path / "bad_shape.npz", input=np.zeros((2, 31), np.float32))
    np.savez(tmp_path / "bad_dtype.npz", input=np.zeros((2, 32), np.float64))
    np.savez(tmp_path / "bad_name.npz", inp=np.zeros((2, 32), np.float32))
    for f, needle in (("bad_shape.npz", "dimension 1 must be 32"), ("bad_dtype.npz", "must be float32"), ("bad_name.npz", "unknown input")):
        r = run_cli("run", lib, "--inputs", str(tmp_path / f))
        assert r.returncode == EXIT_RUNTIME, r.stderr
        assert "'input'" in r.stderr or "inp" in r.stderr
        assert needle in r.stderr


def test_bad_sources_and_flags(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    r = run_cli("export", str(tmp_path / "empty_dir"), "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == EXIT_BAD_INPUT and "config.json" in r.stderr
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    r = run_cli("export", str(tmp_path / "fake.gguf"), "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == EXIT_BAD_INPUT and "fake.gguf" in r.stderr
    # an HF folder of an unsupported causal-LM architecture
    (tmp_path / "neox").mkdir()
    (tmp_path / "neox" / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    r = run_cli("export", str(tmp_path / "neox"), "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == EXIT_UNSUPPORTED and "gpt_neox" in r.stderr.lower()
    assert not (tmp_path / "x.onnx").exists()
    r = run_cli("compile", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "y.so"))
    assert r.returncode == EXIT_USAGE and "missing.onnx" in r.stderr
    run_cli("export", "tests.factories:mlp", "-o", str(tmp_path / "m.onnx"), check=True)
    r = run_cli("compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "y.so"), "--target", "pdp11")
    assert r.returncode == EXIT_USAGE and "pdp11" in r.stderr
    r = run_cli("eval", str(tmp_path / "m.onnx"), "--tokens", "0")
    assert r.returncode == EXIT_USAGE and "--tokens" in r.stderr


def test_out_of_range_token_ids_refused(tiny_llama):
    import shiftc
    from shiftc.errors import RuntimeInputError

    _, lib = tiny_llama
    s = shiftc.load(lib).lm_session()
    with pytest.raises(RuntimeInputError, match="token ids"):
        s.step(np.array([[1, 49152]]))
    with pytest.raises(RuntimeInputError, match="token ids"):
        s.step(np.array([[-1]]))
    assert s.length == 0  # nothing ran


def _header_only_gguf(path: str, arch: str) -> None:
    """A GGUF of architecture ``arch`` with its header and the token embedding only."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(32)
    w.add_value_length(32)
    w.add_tokenizer_model("llama")
    w.add_token_list([b"<s>", b"a"])
    w.add_token_scores([0.0, 0.0])
    w.add_token_types([1, 1])
    w.add_tensor("token_embd.weight", np.zeros((2, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch, code, says", [("bloom", EXIT_UNSUPPORTED, "bloom"),
                                              ("gemma3", EXIT_BAD_INPUT, "missing from the file")])
def test_header_only_gguf_is_refused(tmp_path, arch, code, says):
    """A GGUF's config names no architectures; it holds a decoder. An unsupported one (BLOOM) is
    refused by name before any weight loads, never exported as an encoder; a supported one (Gemma
    3) whose file lacks most weights is never exported with them left at their random
    initialisation."""
    path = str(tmp_path / f"{arch}.gguf")
    _header_only_gguf(path, arch)
    out = tmp_path / f"{arch}.onnx"
    r = run_cli("export", path, "-o", str(out))
    assert r.returncode == code and says in r.stderr and path in r.stderr, r.stderr
    assert not out.exists()
