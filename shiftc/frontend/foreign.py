"""Foreign language-model graphs: an LLM (or encoder) exported to ONNX by another tool, brought
into shiftc's form.

PyTorch's exporter (``torch.onnx.export(..., dynamo=True)``) and Hugging Face optimum
(``optimum-cli export onnx``) write a causal LM as the traced computation: hundreds of Shape /
Gather / Concat / Expand nodes building masks, positions and reshapes at run time, each tool its
own way, with or without KV-cache inputs. Instead of pattern-rewriting every variant of that
arithmetic, the front stage recovers what the graph is a function of — the model's parameters —
and writes shiftc's canonical decoder (``decoder_onnx.build_decoder``) from them:

1. Every weight-reading node is attributed to the module it came from: PyTorch's exporter records
   the module path in each node's ``namespace`` metadata, the TorchScript exporter (optimum) in the
   node name (``/model/layers.0/self_attn/q_proj/MatMul``).
2. A parameter-free skeleton of the Hugging Face model (``config.json`` beside the file, or given)
   lists the parameters to find, each with its module's class. Each is read from the constant its
   module's node consumes, by the op's semantics: ``MatMul(x, B)`` computes x·B, so a Linear
   weight is Bᵀ and a GPT-2 Conv1D weight is B; ``Gemm`` by its ``transB``; an embedding is the
   table a ``Gather`` reads; a norm gain is what a ``Mul`` / ``LayerNormalization`` applies (a
   constant folded ``1 + w`` of Gemma's norms read back as w). Constants behind Transpose / Cast /
   Identity nodes are evaluated; tensors the exporter de-duplicated are found through each of their
   consumers.
3. The canonical graph is built and **checked against the foreign graph** in ONNX Runtime on the
   same tokens (logits within ``CHECK_TOL``) before anything is returned: a graph that computes
   something else — another rope base, a different norm, a modified block — is refused with the
   difference measured, never compiled as a guess.

The result is the graph ``shiftc export`` writes for the same checkpoint: the in-place KV cache,
every pass and the decode path apply unchanged. An encoder (``last_hidden_state`` out) is handled
the same way, re-exported through shiftc's encoder export from the Hugging Face model holding the
weights read back, and checked on its output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import BadInputError, UnsupportedError
from . import metadata as md

# logits of the canonical graph vs the foreign one (ONNX Runtime, float32, the same tokens):
# |Δ| <= CHECK_TOL * (1 + max|logits|); float32 re-association differs by ~1e-6
CHECK_TOL = 1e-3
CHECK_TOKENS = 8
# RMSNorm gains stored as w and applied as (offset + w)
_GAIN_OFFSET = {"gemma3_text": 1.0}


@dataclass
class Lifted:
    model: onnx.ModelProto
    model_type: str
    exporter: str  # "torch.onnx (dynamo)" | "torchscript / optimum"
    max_abs_diff: float


OUTPUTS = {"logits": "causal-lm", "last_hidden_state": "encoder"}


def foreign_task(model: onnx.ModelProto) -> str | None:
    """"causal-lm" / "encoder" for a graph shiftc did not write that takes token ids and returns
    logits / hidden states (a Hugging Face model's export), else None."""
    if "shiftc.task" in {p.key for p in model.metadata_props}:
        return None
    inits = {i.name for i in model.graph.initializer}
    if "input_ids" not in [i.name for i in model.graph.input if i.name not in inits]:
        return None
    return next((OUTPUTS[o.name] for o in model.graph.output if o.name in OUTPUTS), None)


def is_foreign_decoder(model: onnx.ModelProto) -> bool:
    return foreign_task(model) == "causal-lm"


def find_config(onnx_path: str, config: str | os.PathLike | None):
    """The transformers config of a foreign graph: ``config`` (a config.json or a folder holding
    one), else a config.json beside the .onnx file."""
    import transformers

    path = _config_file(onnx_path, config)
    where = os.path.dirname(path)
    if not os.path.isfile(path):
        how = f"'{path}' does not exist" if config is not None else f"there is no config.json beside it ({where})"
        raise BadInputError(
            f"'{onnx_path}' is a decoder graph written by another exporter; shiftc needs its Hugging Face "
            f"configuration to bring it into its own form, and {how}: give it with --config FILE|FOLDER "
            f"(shiftc export {os.path.basename(onnx_path)} --config DIR -o canonical.onnx)")
    try:
        cfg = transformers.AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise BadInputError(f"'{path}': cannot read the model configuration: {str(exc).splitlines()[0]}") from exc
    return getattr(cfg, "text_config", None) or cfg, os.path.dirname(path)


def _config_file(onnx_path: str, config) -> str:
    """``config`` (a config.json or a folder holding one), else the config.json beside the .onnx."""
    where = os.fspath(config) if config is not None else os.path.dirname(os.path.abspath(onnx_path))
    return where if where.endswith(".json") else os.path.join(where, "config.json")


def lift(onnx_path: str, model: onnx.ModelProto, config=None, *, max_positions: int | None = None) -> Lifted:
    """shiftc's own graph of the foreign graph ``model`` (read from ``onnx_path``): a causal LM
    rebuilt by ``decoder_onnx.build_decoder``, an encoder re-exported from the Hugging Face model
    with the weights read back (``export.export_encoder``)."""
    from .decoder_onnx import build_decoder, check_supported

    task = foreign_task(model)
    cfg, cfg_dir = find_config(onnx_path, config)
    reader = _GraphWeights(onnx_path, model)
    tok = cfg_dir if any(os.path.exists(os.path.join(cfg_dir, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                                             "vocab.txt")) else None
    tok = tok and os.path.abspath(tok)
    if task == "causal-lm":
        try:
            check_supported(cfg)
        except UnsupportedError as exc:
            raise UnsupportedError(f"'{onnx_path}': {exc}") from exc
        canonical, spec = build_decoder(cfg, reader.state_dict(cfg, task), max_positions=max_positions)
        md.set_info(canonical, task="causal-lm", decoder=spec.to_json(), tokenizer=tok)
        output = "logits"
    else:
        from .export import export_encoder

        # an encoder's pooler does not feed last_hidden_state: absent from the graph, unused in the output
        canonical = export_encoder(_real_model(onnx_path, cfg, reader.state_dict(cfg, task, unused_ok=("pooler.",))))
        md.set_info(canonical, task="encoder", tokenizer=tok)
        output = "last_hidden_state"
    diff = _check_same_outputs(onnx_path, canonical, cfg, output)
    return Lifted(canonical, cfg.model_type, reader.exporter, diff)


def canonical(path: str, model: onnx.ModelProto, config=None) -> onnx.ModelProto:
    """``model`` itself, or — a foreign decoder graph, or a foreign encoder with its config.json
    beside it — shiftc's own form of it (logged)."""
    task = foreign_task(model)
    if task is None:
        return model
    if task == "encoder" and config is None and not os.path.isfile(_config_file(path, None)):
        return model  # compiled as written (TorchScript exports import as they are)
    from ..progress import log, step

    with step(f"bringing '{os.path.basename(path)}' ({task} graph from another exporter) into shiftc's form"):
        lifted = lift(path, model, config)
    log(f"  {lifted.model_type} graph from {lifted.exporter}: weights read back, outputs equal to the graph's "
        f"(max |diff| {lifted.max_abs_diff:.2g} on {CHECK_TOKENS} tokens)")
    return lifted.model


def _real_model(path: str, config, sd: dict):
    """The Hugging Face encoder of ``config`` holding ``sd`` (every parameter; buffers as built)."""
    import transformers

    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    result = model.load_state_dict(sd, strict=False)
    missing = {k for k in result.missing_keys if not k.startswith("pooler.")} - {n for n, _ in model.named_buffers()}
    if missing or result.unexpected_keys:
        raise UnsupportedError(f"'{path}': the weights read back do not fit the {config.model_type} model "
                               f"(missing {sorted(missing)[:3]}, unexpected {sorted(result.unexpected_keys)[:3]})")
    return model


# -- reading the parameters back ------------------------------------------------------------------


class _GraphWeights:
    """Constants of a graph, grouped by the module whose node consumes them."""

    def __init__(self, path: str, model: onnx.ModelProto):
        self.path = path
        g = model.graph
        self.consts = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.nodes = list(g.node)
        dynamo = any(p.key == "namespace" for n in g.node[:50] for p in n.metadata_props)
        self.exporter = "torch.onnx (dynamo)" if dynamo else "torchscript / optimum"

    def value(self, name: str, depth: int = 0) -> np.ndarray | None:
        """The constant tensor ``name`` (an initializer, a Constant node, or Transpose / Cast /
        Identity of one), else None."""
        if name in self.consts:
            return numpy_helper.to_array(self.consts[name])
        node = self.producer.get(name)
        if node is None or depth > 4:
            return None
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
            return None
        if node.op_type not in ("Transpose", "Cast", "Identity"):
            return None
        x = self.value(node.input[0], depth + 1)
        if x is None:
            return None
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            return np.transpose(x, perm)
        return x

    def candidates(self, modules: set[str]) -> dict[str, list]:
        """module path -> [(node, input index, constant, the node's scalar constant input or None)]
        for every constant input of more than one element."""
        out: dict[str, list] = {}
        for node in self.nodes:
            mod = _module_of(node, modules)
            if mod is None:
                continue
            vals = [self.value(name) if name else None for name in node.input]
            scalars = [float(v.reshape(-1)[0]) for v in vals if v is not None and v.size == 1]
            for k, v in enumerate(vals):
                if v is not None and v.size > 1:
                    out.setdefault(mod, []).append((node, k, v, scalars[0] if scalars else None))
        return out

    def state_dict(self, config, task: str, *, unused_ok: tuple[str, ...] = ()) -> dict:
        import torch

        skeleton = _skeleton(config, task)
        modules = dict(skeleton.named_modules())
        cands = self.candidates(set(modules))
        offset = _GAIN_OFFSET.get(config.model_type, 0.0)
        sd, missing = {}, []
        for name, prm in skeleton.named_parameters():
            mod_name, _, leaf = name.rpartition(".")
            cls = type(modules[mod_name]).__name__
            v = _read_param(cls, leaf, tuple(prm.shape), cands.get(mod_name, []), offset)
            if v is None:
                if not name.startswith(unused_ok):
                    missing.append(name)
            else:
                sd[name] = torch.from_numpy(np.array(v, dtype=np.float32))
        if missing:
            raise UnsupportedError(
                f"'{self.path}': {len(missing)} parameter(s) of the {config.model_type} model were not found in the "
                f"graph ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}): its nodes do not say which "
                "module they belong to (PyTorch's exporter and optimum's do), or it is another architecture")
        return sd


def _module_of(node, modules: set[str]) -> str | None:
    """The skeleton module a node was exported from, or None."""
    path = None
    for p in node.metadata_props:
        if p.key == "namespace":  # ": W/m: LlamaForCausalLM/m.model.layers.0.self_attn.q_proj: Linear/linear: aten.linear"
            mods = [e.split(": ", 1) for e in p.value.split("/")]
            mods = [m[0] for m in mods if len(m) == 2 and m[0].strip() and not m[1].startswith("aten.")]
            path = mods[-1] if mods else None
    if path is None and node.name.startswith("/"):  # TorchScript: "/model/layers.0/self_attn/q_proj/MatMul"
        path = ".".join(node.name.strip("/").split("/")[:-1])
    if not path:
        return None
    parts = path.split(".")
    for i in range(len(parts)):  # a wrapper's prefix ("m.", "model.") dropped until a module matches
        cand = ".".join(parts[i:])
        if cand in modules:
            return cand
    return None


def _attr(node, name: str, default=0):
    return next((a.i for a in node.attribute if a.name == name), default)


def _read_param(cls: str, leaf: str, shape: tuple, cands: list, offset: float) -> np.ndarray | None:
    """The value of one parameter from the constants its module's nodes consume, by op semantics."""
    for node, k, v, scalar in cands:
        op = node.op_type
        if len(shape) == 2 and "Embedding" in cls:
            got = v if (op == "Gather" and k == 0) else None
        elif len(shape) == 2:  # Linear: y = x Wᵀ; GPT-2's Conv1D: y = x W
            xb = v if op == "MatMul" and k == 1 else None
            if op == "Gemm" and k == 1:
                xb = v.T if _attr(node, "transB") else v
            got = None if xb is None else (xb if cls == "Conv1D" else xb.T)
        elif "Norm" in cls and leaf == "weight":
            if op in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization") and k == 1:
                got = v
            elif op == "Mul":
                got = v - offset  # the gain applied; Gemma's (1 + w) folded by the exporter
            elif op == "Add" and scalar is not None:
                got = v + scalar - offset  # Gemma's (1 + w) as written
            else:
                got = None
        elif leaf == "bias":
            got = v if (op == "LayerNormalization" and k == 2) or (op == "Gemm" and k == 2) or op == "Add" else None
        else:
            got = None
        if got is not None and tuple(got.shape) == shape:
            return got
    return None


def _skeleton(config, task: str):
    """The Hugging Face model of ``config`` on the meta device: names, shapes and module classes only."""
    import torch
    import transformers

    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    with torch.device("meta"):
        return auto.from_config(config)


# -- the check ------------------------------------------------------------------------------------


def _check_same_outputs(path: str, canonical: onnx.ModelProto, config, output: str) -> float:
    """Run the file at ``path`` and ``canonical`` on the same tokens; refuse the lift unless
    ``output`` agrees."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, size=(1, CHECK_TOKENS), dtype=np.int64)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    runs = []
    for m in (path, canonical):
        sess = _session(m, opts)
        feeds = {i.name: _feed(path, i, ids, config) for i in sess.get_inputs()}
        k = [o.name for o in sess.get_outputs()].index(output)
        runs.append(np.asarray(sess.run(None, feeds)[k], dtype=np.float32))
    ref, got = runs
    if ref.shape != got.shape:
        raise UnsupportedError(f"'{path}': its {output} has shape {list(ref.shape)}, the {config.model_type} "
                               f"model's {list(got.shape)}: the configuration does not describe this graph")
    diff = float(np.max(np.abs(ref - got)))
    if not diff <= CHECK_TOL * (1.0 + float(np.max(np.abs(ref)))):
        raise UnsupportedError(
            f"'{path}': the graph's {output} differ from those of a {config.model_type} model with its weights "
            f"and configuration by up to {diff:.3g} (max |value| {float(np.max(np.abs(ref))):.3g}): it computes "
            "something else (another rope base, norm or attention variant, or a configuration that does not "
            "belong to it); shiftc will not compile it as a guess")
    return diff


def _session(model, opts):
    """An ONNX Runtime session of a file (its external data beside it) or of an in-memory graph
    (over protobuf's 2 GB limit: written with external data to a temporary folder first)."""
    import tempfile

    import onnxruntime as ort

    cpu = ["CPUExecutionProvider"]
    if isinstance(model, str):
        return ort.InferenceSession(model, opts, providers=cpu)
    if model.ByteSize() < 1 << 30:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=cpu)
    with tempfile.TemporaryDirectory(prefix="shiftc-check-") as d:
        f = os.path.join(d, "model.onnx")
        onnx.save(model, f, save_as_external_data=True, location="model.onnx.data")  # moves the tensors out
        sess = ort.InferenceSession(f, opts, providers=cpu)
        onnx.load_external_data_for_model(model, d)  # and back in
        return sess


def _feed(path: str, inp, ids: np.ndarray, config) -> np.ndarray:
    """A value for one graph input: the tokens, an all-ones mask, positions, an empty cache."""
    n = ids.shape[1]
    dtype = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
             "tensor(float16)": np.float16}.get(inp.type)
    name = inp.name
    if name == "input_ids":
        return ids.astype(dtype)
    if name == "attention_mask":
        return np.ones((1, n), dtype)
    if name == "token_type_ids":
        return np.zeros((1, n), dtype)
    if name in ("position_ids", "cache_position"):
        return np.arange(n, dtype=dtype).reshape((1, n) if name == "position_ids" else (n,))
    if "past" in name and dtype is not None and len(inp.shape) == 4:  # [batch, kv heads, past, head dim]
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return np.zeros((1, n_kv, 0, head_dim), dtype)
    raise UnsupportedError(f"'{path}': graph input '{name}' ({inp.type}) is not one shiftc knows how to feed "
                           "(input_ids, attention_mask, token_type_ids, position_ids, cache_position, past_key_values.*)")
