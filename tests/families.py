"""Tiny random decoders of every family shiftc exports, built with transformers' own classes.

``build(family)`` returns the model in eval mode, its weights seeded and — where a default value
(a norm gain of 1, a bias of 0) would hide a missing weight — perturbed. Used by the decoder
tests (tests/test_backend_correctness.py) and the foreign-graph matrix (tests/test_foreign.py),
which also share the checks at the end (logits vs torch, 3-bit compress + compile vs ONNX Runtime).
"""

from __future__ import annotations

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "gpt2", "opt", "gemma3")
# What each family adds to the Llama block (the docstrings of the tests).
NOTES = {
    "llama": "pre-norm RMSNorm blocks, rotary embeddings, grouped-query attention, SwiGLU, tied head",
    "mistral": "every layer's attention limited to sliding_window keys (3 here, shorter than the test)",
    "qwen2": "q/k/v biases",
    "qwen3": "per-head RMSNorm of q and k before rope, head_dim apart from hidden / heads",
    "smollm3": "layers whose no_rope_layers entry is 0 use no rotary embedding",
    "phi3": "fused qkv_proj and gate_up_proj, split at export into the Llama-family projections",
    "gpt2": "LayerNorm, learned positions, GELU MLP, biases, Conv1D weights; a class name ending in LMHeadModel",
    "opt": "LayerNorm, learned positions read at position + 2, ReLU MLP (fc1/fc2), biases, tied head",
    "gemma3": "embedding x sqrt(hidden), RMSNorm gains 1 + w, four norms per layer, q/k norms, gated tanh-GELU "
              "MLP, scores scaled by query_pre_attn_scalar, a sliding-window layer (window 3) with its own rope "
              "base beside a full one",
}
# Gemma 3's embedding scale and 1 + w gains make activations large enough that the default float16
# cache's rounding (2^-12 relative) exceeds the decoder tolerance: its tests use a float32 cache
KV_DTYPE = {"gemma3": "float32"}


def _llama_like(cls, **kw):
    return cls(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               **kw)


def _config(family: str):
    import transformers as T

    if family == "llama":
        return T.LlamaForCausalLM, _llama_like(T.LlamaConfig, tie_word_embeddings=True)
    if family == "mistral":
        return T.MistralForCausalLM, _llama_like(T.MistralConfig, sliding_window=3)
    if family == "qwen2":
        return T.Qwen2ForCausalLM, _llama_like(T.Qwen2Config)
    if family == "smollm3":
        return T.SmolLM3ForCausalLM, _llama_like(T.SmolLM3Config, no_rope_layers=[1, 0])
    if family == "qwen3":
        return T.Qwen3ForCausalLM, T.Qwen3Config(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=2)
    if family == "phi3":
        return T.Phi3ForCausalLM, T.Phi3Config(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=256,
            tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return T.GPT2LMHeadModel, T.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                               bos_token_id=1, eos_token_id=2)
    if family == "opt":
        return T.OPTForCausalLM, T.OPTConfig(
            vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gemma3":
        return T.Gemma3ForCausalLM, T.Gemma3TextConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=3,
            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
    raise KeyError(family)


def build(family: str):
    """The tiny model of ``family``, seeded, with norms and biases away from their defaults."""
    import torch

    cls, cfg = _config(family)
    torch.manual_seed(FAMILIES.index(family) + 1)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if family == "gemma3" and "norm" in name:
                prm.uniform_(-0.5, 0.5)  # gains 1 + w, w initialised at 0
            elif "norm" in name or ".ln_" in name or "layer_norm" in name:
                prm.uniform_(0.5, 2.0) if name.endswith("weight") else prm.uniform_(-0.5, 0.5)
            elif name.endswith("bias"):
                prm.uniform_(-0.5, 0.5)
            elif "embed_positions" in name:
                prm.normal_(0, 0.5)  # OPT: an offset error in its positions shows
    return model


def dynamo_export(model, path: str, output: str = "logits") -> None:
    """The model as PyTorch's exporter writes it (``torch.onnx.export(..., dynamo=True)``, opset
    18): token ids and attention mask in, ``output`` (logits, or an encoder's last_hidden_state)
    out, batch and sequence dynamic, no cache (the exporter cannot return transformers' cache
    objects)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            kw = {"use_cache": False} if output == "logits" else {}
            return getattr(self.m(input_ids=input_ids, attention_mask=attention_mask, **kw), output)

    ids = torch.tensor([[1, 500, 20, 7]])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(Logits(model), (ids, torch.ones_like(ids)), dynamo=True, verbose=False,
                                input_names=["input_ids", "attention_mask"], output_names=[output],
                                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
    program.save(path)


# -- checks shared by the decoder tests --------------------------------------------------------------

DECODE_IDS = [[1, 500, 20, 7, 400, 3]]  # a prefill of 4 tokens, then two one-token steps


def steps_match_torch(model, path: str, tol: tuple) -> None:
    """``path`` (.onnx or library): a prefill of 4 tokens and two one-token steps through its
    session give the torch model's logits within ``tol`` (rtol, atol)."""
    import numpy as np
    import torch

    import shiftc
    from conftest import assert_close

    ids = torch.tensor(DECODE_IDS)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    s = shiftc.load(path).lm_session()
    got = np.concatenate([s.step(ids[:, :4].numpy()), s.step(ids[:, 4:5].numpy()), s.step(ids[:, 5:].numpy())], axis=1)
    assert_close(got, ref, rtol=tol[0], atol=tol[1], what=f"{path} vs torch")


def compressed_matches_onnx_runtime(onnx_path: str, tmp_path, kv_dtype: str, tol: tuple) -> None:
    """3-bit shift-add (data-free) compresses the graph at ``onnx_path``, the result compiles onto
    the LUT kernels, and the library's logits (prefill, one step) equal ONNX Runtime's on the op
    bodies within ``tol``."""
    import numpy as np

    import shiftc
    from conftest import assert_close

    ids = np.array(DECODE_IDS)
    out, lib = str(tmp_path / "sa3.onnx"), str(tmp_path / "sa3.so")
    rep = shiftc.compress(onnx_path, out, bits=3, group=32, calib="none")
    assert rep["layers"] and all(e["bits"] == 3 for e in rep["layers"].values())
    shiftc.compile(out, lib, kv_dtype=kv_dtype)
    ref, got = shiftc.load(out).lm_session(), shiftc.load(lib).lm_session()
    for chunk in (ids[:, :4], ids[:, 4:5]):
        assert_close(got.step(chunk), ref.step(chunk), rtol=tol[0], atol=tol[1], what=f"{lib} vs ONNX Runtime on {out}")

