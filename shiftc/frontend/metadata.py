"""What shiftc records about a model inside the ONNX file (``metadata_props``) and the library.

Keys (all strings in ONNX metadata_props):
    shiftc.task      causal-lm | encoder | image-classification | custom
    shiftc.decoder   JSON of DecoderSpec for causal LMs (layers, KV heads, head dim, vocab, EOS ids)
    shiftc.tokenizer where the tokenizer comes from (an HF folder or GGUF path), if known
The compiled library carries the same information plus the graph's signature (see backend.compile).
"""

from __future__ import annotations

import json

import onnx

TASKS = ("causal-lm", "encoder", "image-classification", "custom")


def set_info(model: onnx.ModelProto, *, task: str, decoder: dict | None = None, tokenizer: str | None = None) -> None:
    assert task in TASKS, task
    props = {p.key: p.value for p in model.metadata_props}
    props["shiftc.task"] = task
    if decoder is not None:
        props["shiftc.decoder"] = json.dumps(decoder)
    if tokenizer is not None:
        props["shiftc.tokenizer"] = tokenizer
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)


def get_info(model: onnx.ModelProto) -> dict:
    props = {p.key: p.value for p in model.metadata_props}
    info = {"task": props.get("shiftc.task", "custom")}
    if "shiftc.decoder" in props:
        info["decoder"] = json.loads(props["shiftc.decoder"])
    if "shiftc.tokenizer" in props:
        info["tokenizer"] = props["shiftc.tokenizer"]
    return info


def _dims(vi: onnx.ValueInfoProto) -> list | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def signature(model: onnx.ModelProto) -> dict:
    """Inputs and outputs of the graph: name, dtype (numpy name) and shape (ints / symbol names)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    init_names = {i.name for i in model.graph.initializer}

    def one(vi):
        et = vi.type.tensor_type.elem_type
        return {"name": vi.name, "dtype": str(tensor_dtype_to_np_dtype(et)) if et else None, "shape": _dims(vi)}

    return {
        "inputs": [one(v) for v in model.graph.input if v.name not in init_names],
        "outputs": [one(v) for v in model.graph.output],
    }
