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
# the same with a float16 cache: keys and values rounded to 11 significant bits (2^-12 relative)
RTOL_KV16, ATOL_KV16 = 2e-3, 2e-3
# the kernel alone vs a float64 numpy reference on the same (rounded) cache
ATOL_KERNEL = 1e-5
TOL = {"float16": (RTOL_KV16, ATOL_KV16), "float32": (RTOL_KV, ATOL_KV)}


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tmp_path_factory):
    import shiftc

    d = tmp_path_factory.mktemp("kv")
    path, lib, lib_concat = str(d / "tiny.onnx"), str(d / "tiny.so"), str(d / "tiny_concat.so")
    lib32 = str(d / "tiny_kv32.so")
    shiftc.export(tiny_llama_dir, path)
    shiftc.compile(path, lib)
    shiftc.compile(path, lib_concat, kv_cache="concat")
    shiftc.compile(path, lib32, kv_dtype="float32")
    return path, lib, lib_concat, lib32


def _lib(tiny, kv_dtype):
    return tiny[1] if kv_dtype == "float16" else tiny[3]


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
    assert meta["kv_cache"]["dtype"] == "float16" and shiftc.load(tiny[3]).meta["kv_cache"]["dtype"] == "float32"
    assert {i["dtype"] for i in meta["kv_cache"]["main"]["inputs"] if i["name"].startswith("cache.")} == {"float16"}
    assert shiftc.load(tiny[2]).meta["kv_cache"] == {"mode": "concat", "reason": "asked for"}


# decode (main with batch = seq = 1) against main itself: the same graph, its matmuls and norms
# scheduled for one row (another summation order than main's tiles)
RTOL_DECODE, ATOL_DECODE = 1e-5, 1e-5


def test_decode_function_matches_main(tiny):
    """A library with in-place caches carries ``decode`` (main specialised to one sequence and one
    token), and the runtime calls it for such steps: same logits as main on the same caches."""
    import shiftc

    m = shiftc.load(tiny[1])
    assert m.meta["kv_cache"]["decode"] == "decode"
    model = m.model
    assert model._decode is not None
    s = m.lm_session()
    s.step(np.random.default_rng(2).integers(0, 49152, (1, 20)))
    caches = s._caches_for(21)
    args = model._args([np.array([[123]]), np.ones((1, 21), np.int64), np.array([[20]])])
    a = model._main(*args, *caches).numpy()
    b = model._decode(*args, *caches).numpy()
    np.testing.assert_allclose(b, a, rtol=RTOL_DECODE, atol=ATOL_DECODE)
    assert not shiftc.load(tiny[2]).meta["kv_cache"].get("decode")  # functional caches: main only


@pytest.mark.parametrize("kv_dtype", ["float16", "float32"])
def test_session_matches_onnxruntime_across_cache_growth(tiny, kv_dtype):
    """Prefill, single-token steps, and a chunk that takes the cache past its first 256 rows."""
    import shiftc

    rtol, atol = TOL[kv_dtype]
    rng = np.random.default_rng(0)
    sc, sr = shiftc.load(_lib(tiny, kv_dtype)).lm_session(), shiftc.load(tiny[0]).lm_session()
    assert sc.inplace and not sr.inplace
    for chunk in (rng.integers(0, 49152, (1, 9)), [[7]], [[4000]], rng.integers(0, 49152, (1, 300)), [[1]]):
        a, b = sc.step(np.asarray(chunk)), sr.step(np.asarray(chunk))
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    assert sc.length == sr.length == 312 and sc.past[0].shape[2] == 512 and sc.past[0].dtype == kv_dtype
    sc.reset()  # keeps the allocated caches; the stale rows must not be read
    sr.reset()
    assert sc.length == 0 and sc.past[0].shape[2] == 512
    for chunk in (rng.integers(0, 49152, (1, 5)), [[3]]):
        np.testing.assert_allclose(sc.step(np.asarray(chunk)), sr.step(np.asarray(chunk)), rtol=rtol, atol=atol)


@pytest.mark.parametrize("kv_dtype", ["float16", "float32"])
def test_run_with_the_onnx_signature_and_left_padding(tiny, kv_dtype):
    """run() takes the ONNX graph's past/present signature on an in-place library: batch of 2,
    the first sequence left-padded, then one decode step from the presents (float32, whatever the
    cache's element type)."""
    import shiftc

    rtol, atol = TOL[kv_dtype]
    lib, ref = shiftc.load(_lib(tiny, kv_dtype)), shiftc.load(tiny[0])
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
            assert got[name].dtype == np.float32
            np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=f"step {step}: {name}")
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


@pytest.mark.parametrize("kv_dtype", ["float16", "float32"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_path_of_common_head_sizes(head_dim, kv_dtype, tmp_path):
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
    shiftc.compile(path, lib_path, kv_dtype=kv_dtype)
    lib, ref = shiftc.load(lib_path), shiftc.load(path)
    rtol, atol = TOL[kv_dtype]
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
            np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=f"step {step}: {name}")
        feeds = {"input_ids": np.array([[11 + step], [12]]), "attention_mask": np.concatenate([mask, [[1], [1]]], 1),
                 "position_ids": pos[:, -1:] + 1,
                 **{f"past_key_values.{k[len('present.'):]}": v for k, v in want.items() if k.startswith("present.")}}
        mask = feeds["attention_mask"]
        pos = np.concatenate([pos, feeds["position_ids"]], 1)


def _attention_ref(q, kc, vc, mask, scale):
    t = mask.shape[-1]
    k, v = kc[:, :, :t].astype(np.float64), vc[:, :, :t].astype(np.float64)
    s = np.einsum("bhgsd,bhtd->bhgst", q.astype(np.float64), k) * scale + mask[:, None, None]
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhgst,bhtd->bhgsd", p / p.sum(-1, keepdims=True), v)


@pytest.fixture(params=["scalar", "avx2", "avx512", "neon"])
def attention_isa(request):
    """The native module's attention kernel set to one instruction set (skipped where absent)."""
    from shiftc import _native as nat

    try:
        nat.attention_set_isa(request.param)
    except ValueError:
        pytest.skip(f"this CPU has no {request.param}")
    yield nat, request.param
    nat.attention_set_isa("auto")


def test_attention_kernel_on_every_isa(attention_isa):
    """The kernel's copies for each instruction set, float32 and float16 caches, decode (S = 1)
    and prefill rows, D = 64 / 128 (vector paths) and 40 (any D), masked keys, against numpy."""
    nat, isa = attention_isa
    rng = np.random.default_rng(3)
    for d in (64, 128, 40):
        for s, t in ((1, 300), (1, 7), (37, 200)):
            b, kvh, g, m = 2, 3, 3, 320
            q = rng.standard_normal((b, kvh, g, s, d)).astype(np.float32)
            kc, vc = (rng.standard_normal((b, kvh, m, d)).astype(np.float32) for _ in range(2))
            mask = np.zeros((b, s, t), np.float32)
            for r in range(s):
                mask[:, r, t - s + r + 1:] = -1e9  # causal
            mask[1, :, :5] = -1e9  # left padding
            for dtype in (np.float32, np.float16):
                k, v = kc.astype(dtype), vc.astype(dtype)
                got = nat.attention(q, k, v, mask, 0.125)
                np.testing.assert_allclose(got, _attention_ref(q, k, v, mask, 0.125), rtol=0, atol=ATOL_KERNEL,
                                           err_msg=f"{isa} D={d} S={s} {dtype.__name__}")


def test_float16_cache_writes_round_like_numpy(attention_isa):
    """shiftc_kv_write_f16 rounds to nearest even bit for bit as numpy's float16 cast does,
    subnormals, overflow to infinity, infinities and D not a multiple of 16 included, and writes
    only rows [T - S, T)."""
    nat, isa = attention_isa
    rng = np.random.default_rng(4)
    for d in (64, 40):
        rows = (rng.standard_normal((2, 3, 4, d)) * np.logspace(-9, 5, d)).astype(np.float32)
        rows[0, 0, 0, :6] = [1e-7, 7e4, -3e-6, np.inf, -np.inf, 65519.0]
        cache = np.full((2, 3, 16, d), 7, np.float16)
        with np.errstate(over="ignore"):
            want = rows.astype(np.float16)
        nat.kv_write_f16(cache, rows, 10)
        assert np.array_equal(cache[:, :, 6:10].view(np.uint16), want.view(np.uint16)), f"{isa} D={d}"
        assert (cache[:, :, :6] == 7).all() and (cache[:, :, 10:] == 7).all()
