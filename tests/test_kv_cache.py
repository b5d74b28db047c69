"""The in-place KV cache (shiftc/backend/kv_cache.py, csrc/kernels/attention.cc): the graph rewrite,
and compiled decoders checked against ONNX Runtime on the functional graph — prefill, decode
steps past the cache's first growth, batches with left padding, and the ONNX signature through
run()."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from shiftc.backend import kv_cache

# compiled (attention kernel: polynomial exp, float sums in another order) vs ONNX Runtime
RTOL_KV, ATOL_KV = 1e-4, 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tmp_path_factory):
    import shiftc

    d = tmp_path_factory.mktemp("kv")
    path, lib, lib_concat = str(d / "tiny.onnx"), str(d / "tiny.so"), str(d / "tiny_concat.so")
    shiftc.export(tiny_llama_dir, path)
    shiftc.compile(path, lib)
    shiftc.compile(path, lib_concat, kv_cache="concat")
    return path, lib, lib_concat


def _layers(model):
    return json.loads({p.key: p.value for p in model.metadata_props}["shiftc.decoder"])["num_layers"]


def test_rewrite_replaces_every_layers_attention(tiny):
    m = onnx.load(tiny[0])
    out, reason = kv_cache.rewrite(m, _layers(m))
    assert reason == "" and out is not None
    kinds = [n.op_type for n in out.graph.node]
    assert kinds.count(kv_cache.OP) == 2 and "Softmax" not in kinds and "Concat" not in {
        n.op_type for n in out.graph.node if n.output[0].startswith("present.")}
    assert [o.name for o in out.graph.output] == ["logits"]
    caches = [i for i in out.graph.input if i.name.startswith("cache.")]
    assert len(caches) == 4 and all(i.type.tensor_type.shape.dim[2].dim_param == kv_cache.MAX_LEN for i in caches)


def test_rewrite_refuses_a_graph_it_does_not_recognise(tiny):
    m = onnx.load(tiny[0])
    for n in m.graph.node:
        if n.op_type == "Softmax":
            n.op_type = "LogSoftmax"  # no longer attention: the functional cache stays
            break
    out, reason = kv_cache.rewrite(m, _layers(m))
    assert out is None and "Softmax" in reason and reason.startswith("layer 0")


def test_compile_records_the_kv_cache_mode(tiny):
    import shiftc

    meta = shiftc.load(tiny[1]).meta
    assert meta["kv_cache"]["mode"] == "inplace" and meta["pipeline"] == "optimized"  # operator fusion kept
    assert shiftc.load(tiny[2]).meta["kv_cache"] == {"mode": "concat", "reason": "asked for"}


def test_session_matches_onnxruntime_across_cache_growth(tiny):
    """Prefill, single-token steps, and a chunk that takes the cache past its first 256 rows."""
    import shiftc

    rng = np.random.default_rng(0)
    sc, sr = shiftc.load(tiny[1]).lm_session(), shiftc.load(tiny[0]).lm_session()
    assert sc.inplace and not sr.inplace
    for chunk in (rng.integers(0, 49152, (1, 9)), [[7]], [[4000]], rng.integers(0, 49152, (1, 300)), [[1]]):
        a, b = sc.step(np.asarray(chunk)), sr.step(np.asarray(chunk))
        np.testing.assert_allclose(a, b, rtol=RTOL_KV, atol=ATOL_KV)
    assert sc.length == sr.length == 312 and sc.past[0].shape[2] == 512
    sc.reset()  # keeps the allocated caches; the stale rows must not be read
    sr.reset()
    assert sc.length == 0 and sc.past[0].shape[2] == 512
    for chunk in (rng.integers(0, 49152, (1, 5)), [[3]]):
        np.testing.assert_allclose(sc.step(np.asarray(chunk)), sr.step(np.asarray(chunk)), rtol=RTOL_KV, atol=ATOL_KV)


def test_run_with_the_onnx_signature_and_left_padding(tiny):
    """run() takes the ONNX graph's past/present signature on an in-place library: batch of 2,
    the first sequence left-padded, then one decode step from the presents."""
    import shiftc

    lib, ref = shiftc.load(tiny[1]), shiftc.load(tiny[0])
    ids = np.random.default_rng(1).integers(0, 49152, (2, 6))
    mask = np.ones((2, 6), np.int64)
    mask[0, :2] = 0
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((2, 2, 0, 16), np.float32)
    for step in range(2):
        got, want = lib.run(feeds), ref.run(feeds)
        assert list(got) == list(want)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=RTOL_KV, atol=ATOL_KV, err_msg=f"step {step}: {name}")
        feeds = {"input_ids": np.array([[11], [12]]), "attention_mask": np.concatenate([mask, [[1], [1]]], 1),
                 "position_ids": pos[:, -1:] + 1,
                 **{f"past_key_values.{k[len('present.'):]}": v for k, v in want.items() if k.startswith("present.")}}
        mask = feeds["attention_mask"]
        pos = np.concatenate([pos, feeds["position_ids"]], 1)


def test_concat_library_still_matches(tiny):
    import shiftc

    ids = np.random.default_rng(2).integers(0, 49152, (1, 5))
    a = shiftc.load(tiny[2]).lm_session().step(ids)
    b = shiftc.load(tiny[0]).lm_session().step(ids)
    np.testing.assert_allclose(a, b, rtol=RTOL_KV, atol=ATOL_KV)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_path_of_common_head_sizes(head_dim, tmp_path):
    """The decode kernel's vector path for D = 64 and 128 (the tiny model above has D = 16): a
    batch of 2 with the first sequence left-padded (masked keys), prefill then decode steps, against
    ONNX Runtime through run()."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import shiftc

    torch.manual_seed(head_dim)
    cfg = LlamaConfig(vocab_size=512, hidden_size=2 * head_dim, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    path, lib_path = str(tmp_path / "m.onnx"), str(tmp_path / "m.so")
    shiftc.export(str(tmp_path / "hf"), path)
    shiftc.compile(path, lib_path)
    lib, ref = shiftc.load(lib_path), shiftc.load(path)
    assert lib.kv_inplace
    ids = np.random.default_rng(head_dim).integers(0, 512, (2, 37))
    mask = np.ones((2, 37), np.int64)
    mask[0, :5] = 0
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
             **{f"past_key_values.0.{kv}": np.zeros((2, 1, 0, head_dim), np.float32) for kv in ("key", "value")}}
    for step in range(3):
        got, want = lib.run(feeds), ref.run(feeds)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=RTOL_KV, atol=ATOL_KV, err_msg=f"step {step}: {name}")
        feeds = {"input_ids": np.array([[11 + step], [12]]), "attention_mask": np.concatenate([mask, [[1], [1]]], 1),
                 "position_ids": pos[:, -1:] + 1,
                 **{f"past_key_values.{k[len('present.'):]}": v for k, v in want.items() if k.startswith("present.")}}
        mask = feeds["attention_mask"]
        pos = np.concatenate([pos, feeds["position_ids"]], 1)
