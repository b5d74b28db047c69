"""Causal-LM export: write the ONNX graph of a Llama-family decoder directly from its weights.

Tracing a Hugging Face decoder yields hundreds of Shape/Gather/Concat nodes that compute the masks
and reshapes at run time; they slow every backend down and confuse shape inference. For the
Llama family (Llama, Mistral, Qwen2, SmolLM: pre-norm RMSNorm blocks, rotary embeddings, grouped-
query attention, SwiGLU MLP) shiftc writes the graph itself, with no shape arithmetic at all:

Inputs (B = batch, S = new tokens, P = cached tokens, T = P + S):
    input_ids        int64 [B, S]
    attention_mask   int64 [B, T]   1 = real token, 0 = padding (left padding supported)
    position_ids     int64 [B, S]   usually cumsum(attention_mask) - 1 for the new tokens
    past_key_values.{i}.key / .value   float32 [B, KVH, P, D]
Outputs:
    logits           float32 [B, S, V]
    present.{i}.key / .value           float32 [B, KVH, T, D]

Math per block (h = hidden state, x̂ = RMSNorm(x) = x / sqrt(mean(x²) + eps) · w):
    q, k, v = x̂Wq (+bq), x̂Wk (+bk), x̂Wv (+bv); rotary on q, k with
        rope(x) = x·cos + rotate_half(x)·sin,  rotate_half([x1, x2]) = [−x2, x1]
    attention with grouped-query heads: q is viewed as [B, KVH, G, S, D] (G = H / KVH) and
        multiplies k [B, KVH, 1, T, D] by broadcasting, so no key/value repetition is materialised;
    mask: key j is visible to query i iff kpos_j ≤ qpos_i and attention_mask_j = 1, where
        kpos = cumsum(attention_mask) − 1; masked scores get −1e9 before the softmax;
    h += o(attn); h += W_down(silu(x̂ W_gate) ⊙ x̂ W_up).
The LM head reuses the embedding matrix through a Transpose node when the weights are tied.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UnsupportedError

OPSET = 17
SUPPORTED_MODEL_TYPES = ("gemma3_text", "gpt2", "llama", "mistral", "opt", "phi3", "qwen2", "qwen3", "smollm3")
# LayerNorm with biases, learned positions, a plain (not gated) MLP, no rope
LEARNED_POSITIONS = ("gpt2", "opt")
MASK_VALUE = -1e9
# Symbolic length of the attention window. Written as an expression so that shape inference (ONNX
# Runtime, TVM) knows it equals the cached plus the new tokens.
TOTAL = "past + seq"


@dataclass(frozen=True)
class DecoderSpec:
    """What the runtime needs to drive a causal LM exported by this module."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_positions: int | None = None  # longest sequence (prompt + generated) the model supports

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["eos_token_ids"] = list(self.eos_token_ids)
        if not self.max_positions:
            del out["max_positions"]
        return out


class _Graph:
    """A tiny builder: unique names, initializers from numpy, nodes appended in order."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._consts: dict[tuple, str] = {}
        self._n = 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const_i64(self, values) -> str:
        key = ("i64", tuple(values))
        if key not in self._consts:
            self._consts[key] = self.init(self._name("const_i64"), np.asarray(values, np.int64))
        return self._consts[key]

    def const_f32(self, value: float) -> str:
        key = ("f32", float(value))
        if key not in self._consts:
            self._consts[key] = self.init(self._name("const_f32"), np.asarray(value, np.float32))
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [f"{name}" if n_out == 1 else f"{name}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def _rope_inv_freq(config, head_dim: int, layer_type: str | None = None) -> np.ndarray:
    """theta^(-2i/D) for i < D/2, float64 (``linear`` scaling: divided by its factor). Models whose
    layers differ (Gemma 3: sliding and full attention) give the parameters per ``layer_type``."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and layer_type in rope:
        rope = rope[layer_type]
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta or getattr(config, "rope_theta", 10000.0)
    if rope_type not in ("default", "linear", None):
        raise UnsupportedError(
            f"rotary embedding type '{rope_type}' is not supported by the decoder exporter "
            "(supported: default, linear)"
        )
    factor = float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0
    partial = (rope.get("partial_rotary_factor") if isinstance(rope, dict) else None) or \
        getattr(config, "partial_rotary_factor", 1.0) or 1.0
    if float(partial) != 1.0:
        raise UnsupportedError(f"partial rotary embeddings (partial_rotary_factor {partial}) are not supported "
                               "by the decoder exporter (supported: 1.0)")
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)) / factor


def _split_fused_projections(sd: dict, n_layers: int, q_rows: int, kv_rows: int) -> dict:
    """Phi-3 stores q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (gate first):
    the separate Llama-family weights, as views (the ONNX graph and every pass see the same
    per-projection MatMuls as for Llama)."""
    for i in range(n_layers):
        p = f"model.layers.{i}"
        qkv = sd.pop(f"{p}.self_attn.qkv_proj.weight", None)
        if qkv is not None:
            sd[f"{p}.self_attn.q_proj.weight"] = qkv[:q_rows]
            sd[f"{p}.self_attn.k_proj.weight"] = qkv[q_rows:q_rows + kv_rows]
            sd[f"{p}.self_attn.v_proj.weight"] = qkv[q_rows + kv_rows:]
        gate_up = sd.pop(f"{p}.mlp.gate_up_proj.weight", None)
        if gate_up is not None:
            half = gate_up.shape[0] // 2
            sd[f"{p}.mlp.gate_proj.weight"], sd[f"{p}.mlp.up_proj.weight"] = gate_up[:half], gate_up[half:]
    return sd


def check_supported(config) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedError(
            f"causal-LM architecture '{mt}' is not supported by shiftc's decoder exporter "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if mt == "opt":
        _check_opt(config)
        return
    if mt == "gemma3_text":
        act = getattr(config, "hidden_activation", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise UnsupportedError(f"Gemma 3 hidden_activation '{act}' is not supported (supported: gelu_pytorch_tanh)")
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, cap, None):
                raise UnsupportedError(f"Gemma 3 with {cap} is not supported")
        return
    if mt == "gpt2":
        act = getattr(config, "activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedError(f"GPT-2 activation_function '{act}' is not supported (supported: gelu_new)")
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise UnsupportedError("GPT-2 with scale_attn_by_inverse_layer_idx is not supported")
        return
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"hidden_act '{act}' is not supported (supported: silu)")


def _check_opt(config) -> None:
    act = getattr(config, "activation_function", "relu")
    if act != "relu":
        raise UnsupportedError(f"OPT activation_function '{act}' is not supported (supported: relu)")
    if not getattr(config, "do_layer_norm_before", True) or getattr(config, "_remove_final_layer_norm", False):
        raise UnsupportedError("OPT with post-layer norm (do_layer_norm_before false, OPT-350m) is not supported")
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        raise UnsupportedError("OPT with project_in/project_out (word_embed_proj_dim != hidden_size) is not supported")
    if not getattr(config, "layer_norm_elementwise_affine", True):
        raise UnsupportedError("OPT without LayerNorm weights (layer_norm_elementwise_affine false) is not supported")


def _opt_as_llama_names(sd: dict, n_layers: int) -> dict:
    """OPT's weights under the names the builder reads. Its learned positions are looked up at
    position + 2 (OPTLearnedPositionalEmbedding's offset): the table from row 2 on is indexed by
    the position itself."""
    d = "model.decoder"
    out = {"model.embed_tokens.weight": sd[f"{d}.embed_tokens.weight"],
           "model.embed_positions.weight": sd[f"{d}.embed_positions.weight"][2:],
           "model.norm.weight": sd[f"{d}.final_layer_norm.weight"], "model.norm.bias": sd[f"{d}.final_layer_norm.bias"]}
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    names = (("self_attn_layer_norm", "input_layernorm"), ("final_layer_norm", "post_attention_layernorm"),
             ("self_attn.q_proj", "self_attn.q_proj"), ("self_attn.k_proj", "self_attn.k_proj"),
             ("self_attn.v_proj", "self_attn.v_proj"), ("self_attn.out_proj", "self_attn.o_proj"),
             ("fc1", "mlp.up_proj"), ("fc2", "mlp.down_proj"))
    for i in range(n_layers):
        for a, b in names:
            for kind in ("weight", "bias"):
                key = f"{d}.layers.{i}.{a}.{kind}"
                if key in sd:
                    out[f"model.layers.{i}.{b}.{kind}"] = sd[key]
    return out


def _gpt2_as_llama_names(sd: dict, n_layers: int, hidden: int) -> dict:
    """GPT-2's weights under the names the builder reads (its Conv1D weights are [in, out]: the
    Linear layout [out, in] is their transpose); the learned positions stay ``model.embed_positions``."""
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.embed_positions.weight": sd["transformer.wpe.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"], "model.norm.bias": sd["transformer.ln_f.bias"]}
    for i in range(n_layers):
        src, p = f"transformer.h.{i}", f"model.layers.{i}"
        for a, b in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            out[f"{p}.{b}.weight"], out[f"{p}.{b}.bias"] = sd[f"{src}.{a}.weight"], sd[f"{src}.{a}.bias"]
        w, bias = sd[f"{src}.attn.c_attn.weight"].t(), sd[f"{src}.attn.c_attn.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{p}.self_attn.{name}.weight"] = w[j * hidden:(j + 1) * hidden]
            out[f"{p}.self_attn.{name}.bias"] = bias[j * hidden:(j + 1) * hidden]
        for a, b in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")):
            out[f"{p}.{b}.weight"], out[f"{p}.{b}.bias"] = sd[f"{src}.{a}.weight"].t(), sd[f"{src}.{a}.bias"]
    return out


def export_decoder(model, *, max_positions: int | None = None) -> tuple[onnx.ModelProto, DecoderSpec]:
    """Build the ONNX graph of a supported causal-LM torch module (SUPPORTED_MODEL_TYPES; weights
    in fp32): the Llama family, and GPT-2 and OPT through the same builder."""
    return build_decoder(model.config, dict(model.state_dict()), max_positions=max_positions)


def build_decoder(config, state_dict: dict, *, max_positions: int | None = None) -> tuple[onnx.ModelProto, DecoderSpec]:
    """The decoder graph of ``config`` (a transformers config) with the weights of ``state_dict``
    (Hugging Face parameter names, torch tensors); a tied head may be absent from it."""
    check_supported(config)
    b = _DecoderBuilder(config, state_dict)
    h = b.embed()
    for i in range(b.n_layers):
        h = b.layer(i, h)
    h = b.norm(h, "model.norm.weight", "final_norm")
    if "lm_head.weight" in b.sd and not getattr(config, "tie_word_embeddings", False):
        head = b.g.init("lm_head.weight.T", _np(b.sd["lm_head.weight"]).T)
    else:
        head = b.g.op("Transpose", [b.emb_name], "lm_head_tied", perm=[1, 0])
    b.g.op("MatMul", [h, head], "logits")

    graph = helper.make_graph(b.g.nodes, "shiftc_decoder", b.inputs, b.outputs, b.g.inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="shiftc")
    onnx_model.ir_version = 8
    eos = getattr(config, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    max_pos = int(max_positions or min(getattr(config, "max_position_embeddings", 4096), 32768))
    spec = DecoderSpec(b.n_layers, b.n_kv, b.head_dim, b.vocab, tuple(int(e) for e in eos_ids), max_pos)
    return onnx_model, spec


class _DecoderBuilder:
    """The decoder graph, piece by piece: embedding, rotary angles, mask, then one layer at a time."""

    def __init__(self, config, sd: dict):
        self.config = config
        mt = config.model_type
        self.learned_pos = mt in LEARNED_POSITIONS  # LayerNorm, learned positions, plain MLP, biases, no rope
        self.act = {"gpt2": "gelu_tanh", "opt": "relu", "gemma3_text": "gelu_tanh_gated"}.get(mt, "silu_gated")
        # Gemma 3: embedding scaled by sqrt(hidden), RMSNorm gains 1 + w, four norms per layer,
        # scores scaled by query_pre_attn_scalar^-1/2, sliding-window layers with their own rope
        self.gemma = mt == "gemma3_text"
        # attention per layer: "full_attention" or "sliding_attention" (keys fewer than sliding_window
        # positions back); Mistral's sliding_window applies to every layer
        self.layer_types = list(getattr(config, "layer_types", None) or [])
        if not self.layer_types and mt == "mistral" and getattr(config, "sliding_window", None):
            self.layer_types = ["sliding_attention"] * config.num_hidden_layers
        # SmolLM3: layers whose no_rope_layers entry is 0 use no rotary embedding
        self.no_rope = [not x for x in (getattr(config, "no_rope_layers", None) or [])]
        self.hidden = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.n_heads
        self.group = self.n_heads // self.n_kv
        self.n_layers = config.num_hidden_layers
        self.vocab = config.vocab_size
        # OPT's LayerNorm is torch's default (eps 1e-5)
        self.eps = float(1e-5 if mt == "opt" else config.layer_norm_epsilon if mt == "gpt2" else config.rms_norm_eps)
        if mt == "opt":
            self.sd = _opt_as_llama_names(sd, self.n_layers)
        elif mt == "gpt2":
            self.sd = _gpt2_as_llama_names(sd, self.n_layers, self.hidden)
        else:
            self.sd = _split_fused_projections(sd, self.n_layers, self.n_heads * self.head_dim,
                                               self.n_kv * self.head_dim)
        self.g = _Graph()
        self.inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", TOTAL]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        ]
        self.outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", self.vocab])]

    def embed(self) -> str:
        """Token (+ GPT-2: position) embedding; the rotary angles and the mask every layer reads."""
        g = self.g
        self.emb_name = g.init("model.embed_tokens.weight", _np(self.sd["model.embed_tokens.weight"]))
        h = g.op("Gather", [self.emb_name, "input_ids"], "embed", axis=0)
        if self.learned_pos:
            wpe = g.init("model.embed_positions.weight", _np(self.sd["model.embed_positions.weight"]))
            h = g.op("Add", [h, g.op("Gather", [wpe, "position_ids"], "embed_pos", axis=0)], "embed_sum")
        elif self.gemma:
            h = g.op("Mul", [h, g.const_f32(float(np.float32(self.hidden ** 0.5)))], "embed_scaled")
            self.ropes = {t: self._rope_angles(t, f"_{t.split('_')[0]}") for t in dict.fromkeys(self.layer_types)}
        else:
            self.ropes = {None: self._rope_angles()}
        self._mask()
        scalar = float(getattr(self.config, "query_pre_attn_scalar", None) or self.head_dim) if self.gemma \
            else self.head_dim
        self.scale = g.const_f32(1.0 / np.sqrt(scalar))
        return h

    def _rope_angles(self, layer_type: str | None = None, sfx: str = "") -> tuple[str, str, str, str]:
        """Rotary angles of the new positions, computed per step (no [max_pos, D/2] tables in the
        model: 0.5 MB for 2048 positions of D = 64) in float64, so that cos/sin are as exact as
        tables made in float64 were, then broadcastable to q [B,KVH,G,S,D/2] and k [B,KVH,S,D/2];
        rope is applied on the two halves separately. Returns (cos_q, sin_q, cos_k, sin_k)."""
        g = self.g
        inv_freq = g.init(f"rope{sfx}.inv_freq", _rope_inv_freq(self.config, self.head_dim, layer_type))  # float64
        pos = g.op("Cast", ["position_ids"], f"rope_pos{sfx}", to=TensorProto.DOUBLE)
        angle = g.op("Mul", [g.op("Unsqueeze", [pos, g.const_i64([2])], f"rope_pos3{sfx}"), inv_freq],
                     f"rope_angle{sfx}")  # [B,S,D/2]
        cos = g.op("Cast", [g.op("Cos", [angle], f"rope_cos64{sfx}")], f"rope_cos{sfx}", to=TensorProto.FLOAT)
        sin = g.op("Cast", [g.op("Sin", [angle], f"rope_sin64{sfx}")], f"rope_sin{sfx}", to=TensorProto.FLOAT)
        cos_k = g.op("Unsqueeze", [cos, g.const_i64([1])], f"rope_cos_k{sfx}")  # [B,1,S,D/2]
        sin_k = g.op("Unsqueeze", [sin, g.const_i64([1])], f"rope_sin_k{sfx}")
        cos_q = g.op("Unsqueeze", [cos_k, g.const_i64([1])], f"rope_cos_q{sfx}")  # [B,1,1,S,D/2]
        sin_q = g.op("Unsqueeze", [sin_k, g.const_i64([1])], f"rope_sin_q{sfx}")
        return cos_q, sin_q, cos_k, sin_k

    def _mask(self) -> None:
        """Additive attention mask [B,1,1,S,T]."""
        g = self.g
        kpos = g.op("CumSum", ["attention_mask", g.const_i64([1])], "mask_cumsum")
        kpos = g.op("Sub", [kpos, g.const_i64([1])], "mask_kpos")  # [B,T]
        kpos = g.op("Unsqueeze", [kpos, g.const_i64([1, 2, 3])], "mask_kpos5")  # [B,1,1,1,T]
        qpos = g.op("Unsqueeze", ["position_ids", g.const_i64([1, 2, 4])], "mask_qpos5")  # [B,1,1,S,1]
        causal = g.op("LessOrEqual", [kpos, qpos], "mask_causal")
        am5 = g.op("Unsqueeze", ["attention_mask", g.const_i64([1, 2, 3])], "mask_am5")
        valid = g.op("Greater", [am5, g.const_i64([0])], "mask_valid")
        allowed = g.op("And", [causal, valid], "mask_allowed")
        self.mask = g.op("Where", [allowed, g.const_f32(0.0), g.const_f32(MASK_VALUE)], "mask_add")
        self.masks = {None: self.mask, "full_attention": self.mask}
        if "sliding_attention" in self.layer_types:  # keys less than sliding_window positions back
            window = int(self.config.sliding_window)
            near = g.op("Less", [g.op("Sub", [qpos, kpos], "mask_dist"), g.const_i64([window])], "mask_near")
            local = g.op("And", [allowed, near], "mask_allowed_local")
            self.masks["sliding_attention"] = g.op("Where", [local, g.const_f32(0.0), g.const_f32(MASK_VALUE)],
                                                   "mask_add_local")

    def norm(self, x: str, weight_key: str, name: str) -> str:
        """RMSNorm over the last axis (GPT-2: LayerNorm, with its bias)."""
        g, sd = self.g, self.sd
        # Gemma 3 multiplies by (1 + w), in float32: folded into the stored gain
        w = g.init(weight_key, _np(sd[weight_key]) + np.float32(1.0) if self.gemma else _np(sd[weight_key]))
        if self.learned_pos:
            bias_key = weight_key[: -len("weight")] + "bias"
            b = g.init(bias_key, _np(sd[bias_key]))
            return g.op("LayerNormalization", [x, w, b], f"{name}_out", axis=-1, epsilon=self.eps)
        sq = g.op("Mul", [x, x], f"{name}_sq")
        ms = g.op("ReduceMean", [sq], f"{name}_mean", axes=[-1], keepdims=1)
        ms = g.op("Add", [ms, g.const_f32(self.eps)], f"{name}_eps")
        rs = g.op("Sqrt", [ms], f"{name}_sqrt")
        y = g.op("Div", [x, rs], f"{name}_div")
        return g.op("Mul", [y, w], f"{name}_out")

    def linear(self, x: str, prefix: str, name: str) -> str:
        g, sd = self.g, self.sd
        wt = g.init(f"{prefix}.weight.T", _np(sd[f"{prefix}.weight"]).T)  # [in, out]
        y = g.op("MatMul", [x, wt], name)
        if f"{prefix}.bias" in sd:
            b = g.init(f"{prefix}.bias", _np(sd[f"{prefix}.bias"]))
            y = g.op("Add", [y, b], f"{name}_bias")
        return y

    def rope(self, x: str, cos_: str, sin_: str, axis: int, name: str) -> str:
        g, half = self.g, self.head_dim // 2
        x1, x2 = g.op("Split", [x, g.const_i64([half, half])], f"{name}_split", n_out=2, axis=axis)
        a = g.op("Sub", [g.op("Mul", [x1, cos_], f"{name}_x1c"), g.op("Mul", [x2, sin_], f"{name}_x2s")], f"{name}_lo")
        b = g.op("Add", [g.op("Mul", [x2, cos_], f"{name}_x2c"), g.op("Mul", [x1, sin_], f"{name}_x1s")], f"{name}_hi")
        return g.op("Concat", [a, b], f"{name}_out", axis=axis)

    def layer(self, i: int, h: str) -> str:
        p = f"model.layers.{i}"
        a = self.attention(i, self.norm(h, f"{p}.input_layernorm.weight", f"l{i}_attn_norm"))
        if self.gemma:  # norms after attention and the MLP too
            a = self.norm(a, f"{p}.post_attention_layernorm.weight", f"l{i}_attn_post_norm")
            h = self.g.op("Add", [h, a], f"l{i}_resid1")
            m = self.mlp(i, self.norm(h, f"{p}.pre_feedforward_layernorm.weight", f"l{i}_mlp_norm"))
            m = self.norm(m, f"{p}.post_feedforward_layernorm.weight", f"l{i}_mlp_post_norm")
            return self.g.op("Add", [h, m], f"l{i}_resid2")
        h = self.g.op("Add", [h, a], f"l{i}_resid1")
        x = self.norm(h, f"{p}.post_attention_layernorm.weight", f"l{i}_mlp_norm")
        return self.g.op("Add", [h, self.mlp(i, x)], f"l{i}_resid2")

    def _layer_type(self, i: int) -> str | None:
        return self.layer_types[i] if self.layer_types else None

    def _qkv(self, i: int, x: str) -> tuple[str, str, str]:
        """q [B,KVH,G,S,D], k and v [B,KVH,S,D] of the new positions (rope applied)."""
        g, p, n_kv, d = self.g, f"model.layers.{i}", self.n_kv, self.head_dim
        q = self.linear(x, f"{p}.self_attn.q_proj", f"l{i}_q")
        k = self.linear(x, f"{p}.self_attn.k_proj", f"l{i}_k")
        v = self.linear(x, f"{p}.self_attn.v_proj", f"l{i}_v")
        q = g.op("Reshape", [q, g.const_i64([0, 0, n_kv, self.group, d])], f"l{i}_q_heads")
        k = g.op("Reshape", [k, g.const_i64([0, 0, n_kv, d])], f"l{i}_k_heads")
        if f"{p}.self_attn.q_norm.weight" in self.sd:  # Qwen3: RMSNorm of each head's q and k, before rope
            q = self.norm(q, f"{p}.self_attn.q_norm.weight", f"l{i}_q_norm")
            k = self.norm(k, f"{p}.self_attn.k_norm.weight", f"l{i}_k_norm")
        q = g.op("Transpose", [q], f"l{i}_q_t", perm=[0, 2, 3, 1, 4])  # [B,KVH,G,S,D]
        k = g.op("Transpose", [k], f"l{i}_k_t", perm=[0, 2, 1, 3])  # [B,KVH,S,D]
        v = g.op("Reshape", [v, g.const_i64([0, 0, n_kv, d])], f"l{i}_v_heads")
        v = g.op("Transpose", [v], f"l{i}_v_t", perm=[0, 2, 1, 3])
        if not self.learned_pos and not (self.no_rope and self.no_rope[i]):
            cos_q, sin_q, cos_k, sin_k = self.ropes[self._layer_type(i) if self.gemma else None]
            q = self.rope(q, cos_q, sin_q, 4, f"l{i}_q_rope")
            k = self.rope(k, cos_k, sin_k, 3, f"l{i}_k_rope")
        return q, k, v

    def attention(self, i: int, x: str) -> str:
        """Self-attention over the past cache and the new positions; the cache in and out are graph
        inputs/outputs ``past_key_values.{i}.*`` / ``present.{i}.*``."""
        g, n_kv, d = self.g, self.n_kv, self.head_dim
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        self.inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", n_kv, "past", d])
                        for n in (past_k, past_v)]
        q, k, v = self._qkv(i, x)
        k_all = g.op("Concat", [past_k, k], f"present.{i}.key", axis=2)  # [B,KVH,T,D]
        v_all = g.op("Concat", [past_v, v], f"present.{i}.value", axis=2)
        self.outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", n_kv, TOTAL, d])
                         for n in (k_all, v_all)]
        kt = g.op("Transpose", [k_all], f"l{i}_kT", perm=[0, 1, 3, 2])  # [B,KVH,D,T]
        kt = g.op("Unsqueeze", [kt, g.const_i64([2])], f"l{i}_kT5")  # [B,KVH,1,D,T]
        v5 = g.op("Unsqueeze", [v_all, g.const_i64([2])], f"l{i}_v5")  # [B,KVH,1,T,D]
        s = g.op("MatMul", [q, kt], f"l{i}_scores")  # [B,KVH,G,S,T]
        s = g.op("Mul", [s, self.scale], f"l{i}_scaled")
        s = g.op("Add", [s, self.masks[self._layer_type(i)]], f"l{i}_masked")
        pr = g.op("Softmax", [s], f"l{i}_probs", axis=-1)
        a = g.op("MatMul", [pr, v5], f"l{i}_attn")  # [B,KVH,G,S,D]
        a = g.op("Transpose", [a], f"l{i}_attn_t", perm=[0, 3, 1, 2, 4])  # [B,S,KVH,G,D]
        a = g.op("Reshape", [a, g.const_i64([0, 0, self.n_heads * d])], f"l{i}_attn_merge")
        return self.linear(a, f"model.layers.{i}.self_attn.o_proj", f"l{i}_o")

    def mlp(self, i: int, x: str) -> str:
        g, p = self.g, f"model.layers.{i}"
        if self.act == "relu":  # OPT
            u = self.linear(x, f"{p}.mlp.up_proj", f"l{i}_up")
            return self.linear(g.op("Relu", [u], f"l{i}_relu"), f"{p}.mlp.down_proj", f"l{i}_down")
        if self.act == "gelu_tanh":  # GPT-2
            act = self._gelu_tanh(self.linear(x, f"{p}.mlp.up_proj", f"l{i}_up"), f"l{i}")
            return self.linear(act, f"{p}.mlp.down_proj", f"l{i}_down")
        gate = self.linear(x, f"{p}.mlp.gate_proj", f"l{i}_gate")
        up = self.linear(x, f"{p}.mlp.up_proj", f"l{i}_up")
        if self.act == "gelu_tanh_gated":  # Gemma 3
            act = self._gelu_tanh(gate, f"l{i}")
        else:
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"l{i}_sigmoid")], f"l{i}_silu")
        return self.linear(g.op("Mul", [act, up], f"l{i}_glu"), f"{p}.mlp.down_proj", f"l{i}_down")

    def _gelu_tanh(self, u: str, name: str) -> str:
        """GELU (tanh form): 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))."""
        g = self.g
        u3 = g.op("Mul", [g.op("Mul", [u, u], f"{name}_u2"), u], f"{name}_u3")
        inner = g.op("Mul", [g.op("Add", [u, g.op("Mul", [u3, g.const_f32(0.044715)], f"{name}_cu3")], f"{name}_poly"),
                             g.const_f32(float(np.sqrt(2.0 / np.pi)))], f"{name}_inner")
        t = g.op("Add", [g.op("Tanh", [inner], f"{name}_tanh"), g.const_f32(1.0)], f"{name}_1pt")
        return g.op("Mul", [g.op("Mul", [u, t], f"{name}_ut"), g.const_f32(0.5)], f"{name}_gelu")
