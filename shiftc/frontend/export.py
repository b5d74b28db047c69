"""Export a model to ONNX: a Hugging Face folder, a GGUF file, or ``module:factory``.

Sources
    HF folder (config.json + weights)  causal LM (Llama family, written by decoder_onnx with a KV
                                       cache), encoder (feature extraction: last_hidden_state) or
                                       image classification (logits), chosen from the config's
                                       architectures.
    GGUF file (or a folder holding one) a causal LM; transformers dequantizes it to fp32.
    module:factory                     a Python callable returning ``(torch_module, example_inputs)``
                                       or a dict with keys model, inputs and optionally
                                       input_names, output_names, dynamic_axes, task.
Encoders, image models and factories are traced with the TorchScript exporter (opset 17) and
simplified with onnxslim (constant folding, shape-subgraph elimination); batch and sequence axes
stay dynamic. The ONNX file is written atomically.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError, UnsupportedError, UsageError
from ..progress import step
from . import metadata as md
from .onnx_io import save_model

OPSET = 17


@dataclass
class ExportResult:
    path: str
    task: str
    size_bytes: int
    num_nodes: int

    def to_json(self) -> dict:
        from ..timing import peak_rss_bytes

        return {"path": self.path, "task": self.task, "size_bytes": self.size_bytes, "num_nodes": self.num_nodes,
                "peak_rss_bytes": peak_rss_bytes()}


# -- source resolution ---------------------------------------------------------------------------


def resolve_source(src: str) -> tuple[str, str, str | None]:
    """-> (kind, folder_or_path, gguf_file_name) with kind in {"hf", "gguf", "onnx", "factory"}."""
    p = Path(src)
    if p.is_file():
        if p.suffix.lower() == ".onnx":
            return "onnx", str(p), None
        if p.suffix.lower() != ".gguf":
            raise BadInputError(f"'{src}': a file source must be a .gguf or .onnx file (or give an HF folder or "
                                "module:factory)")
        _check_gguf_magic(p)
        return "gguf", str(p.parent), p.name
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf", str(p), None
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            _check_gguf_magic(ggufs[0])
            return "gguf", str(p), ggufs[0].name
        raise BadInputError(
            f"'{src}' is neither a Hugging Face model folder (no config.json) nor a folder with one .gguf file"
        )
    if ":" in src and not os.path.exists(src):
        return "factory", src, None
    raise BadInputError(f"model source '{src}' does not exist (expected an HF folder, a .gguf file or module:factory)")


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise BadInputError(f"'{path}' is not a GGUF file (bad magic {magic!r})")


def load_hf_model(src: str, *, kind: str | None = None):
    """Load a torch model from an HF folder or GGUF -> (model, task, tokenizer_source)."""
    import torch
    import transformers

    if kind is None:
        kind, folder, gguf = resolve_source(src)
    else:
        folder, gguf = src, None
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        config = transformers.AutoConfig.from_pretrained(folder, **kw)
    except Exception as exc:
        raise BadInputError(f"'{src}': cannot read the model configuration: {_first(exc)}") from exc
    archs = list(getattr(config, "architectures", None) or [])
    task = _task_from_config(config, archs, src, gguf=bool(gguf))
    if task == "causal-lm":
        from .decoder_onnx import check_supported

        try:
            check_supported(config)  # before the weights load: an unsupported decoder fails fast, by name
        except UnsupportedError as exc:
            raise UnsupportedError(f"'{src}': {exc}") from exc
    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "image-classification": transformers.AutoModelForImageClassification,
        "encoder": transformers.AutoModel,
    }[task]
    try:
        model, info = auto.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                           output_loading_info=True, **kw)
    except Exception as exc:
        raise BadInputError(f"'{src}': cannot load the model weights: {_first(exc)}") from exc
    # a weight the file lacks would be left at its random initialisation: refuse, never export it
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(info.get("missing_keys") or ()) - tied)
    if missing:
        raise BadInputError(f"'{src}': {len(missing)} weight(s) of the model are missing from the file "
                            f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}); it is incomplete "
                            "or of another architecture")
    model.eval()
    tok_src = os.path.join(folder, gguf) if gguf else folder
    return model, task, tok_src


def _task_from_config(config, archs: list[str], src: str, gguf: bool = False) -> str:
    from .decoder_onnx import SUPPORTED_MODEL_TYPES

    # a causal LM's head class ends in ForCausalLM or LMHeadModel (GPT2LMHeadModel: it also ends in
    # "Model", which would make it an encoder below)
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or \
            (not archs and config.model_type in SUPPORTED_MODEL_TYPES):
        return "causal-lm"
    if gguf:  # a GGUF holds a llama.cpp decoder; its config names no architectures
        return "causal-lm"
    if any(a.endswith("ForImageClassification") for a in archs):
        return "image-classification"
    if any(a.endswith(("Model", "ForMaskedLM", "ForPreTraining")) for a in archs) or not archs:
        return "encoder"
    raise UnsupportedError(f"'{src}': architectures {archs} are not supported (causal LM, encoder, image classification)")


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# -- exporters -------------------------------------------------------------------------------------


def export(src: str, output: str | os.PathLike, *, task: str | None = None, max_positions: int | None = None,
           config: str | os.PathLike | None = None) -> ExportResult:
    """Export ``src`` to ONNX at ``output``; an .onnx decoder graph from another exporter is
    brought into shiftc's form (``config``: its HF configuration, default the one beside it)."""
    output = os.fspath(output)
    if not output.endswith(".onnx"):
        raise UsageError(f"-o '{output}': the output must be an .onnx file")
    kind, _, _ = resolve_source(src)
    if config is not None and kind != "onnx":
        raise UsageError(f"--config applies to an .onnx source; '{src}' carries its own configuration")
    if kind == "onnx":
        model = _canonical_onnx(src, task, max_positions, config)
    elif kind == "factory":
        model = export_factory(src)
    else:
        with step(f"loading {src}"):
            torch_model, found_task, tok_src = load_hf_model(src)
        if task and task != found_task:
            raise UsageError(f"--task {task}: '{src}' is a {found_task} model")
        with step(f"exporting {found_task} graph"):
            if found_task == "causal-lm":
                from .decoder_onnx import export_decoder

                model, spec = export_decoder(torch_model, max_positions=max_positions)
                md.set_info(model, task="causal-lm", decoder=spec.to_json(), tokenizer=os.path.abspath(tok_src))
            elif found_task == "encoder":
                model = export_encoder(torch_model)
                md.set_info(model, task="encoder", tokenizer=os.path.abspath(tok_src))
            else:
                model = export_image_classifier(torch_model)
                md.set_info(model, task="image-classification")
    with step(f"writing {output}"):
        save_model(model, output)
    return ExportResult(output, md.get_info(model)["task"], os.path.getsize(output), len(model.graph.node))


def _canonical_onnx(src: str, task: str | None, max_positions: int | None, config):
    """A foreign decoder or encoder graph in shiftc's form (checked against it: shiftc/frontend/foreign.py)."""
    from . import foreign
    from .onnx_io import load_model

    with step(f"loading {src}"):
        model = load_model(src)
    found = foreign.foreign_task(model)
    if found is None:
        what = md.get_info(model)["task"]
        raise UsageError(f"'{src}' is not a language-model graph from another exporter (an input_ids input, a logits "
                         f"or last_hidden_state output, no shiftc metadata; shiftc reads it as '{what}'): compile "
                         "or compress it directly")
    if task and task != found:
        raise UsageError(f"--task {task}: '{src}' is a {found} graph")
    with step(f"bringing the {found} graph into shiftc's form"):
        lifted = foreign.lift(src, model, config, max_positions=max_positions)
    return lifted.model


def _trace(module, inputs: tuple, input_names, output_names, dynamic_axes):
    """TorchScript export to an in-memory ModelProto, then onnxslim simplification."""
    import io

    import onnx
    import onnxslim
    import torch

    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            module, inputs, buf, input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False,
        )
    model = onnx.load_from_string(buf.getvalue())
    return onnxslim.slim(model)


def export_encoder(model):
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "last_hidden_state": {0: "batch", 1: "seq"}}
    return _trace(Encoder(model), (ids, mask), ["input_ids", "attention_mask"], ["last_hidden_state"], axes)


def export_image_classifier(model):
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).logits

    size = getattr(model.config, "image_size", 224)
    size = size if isinstance(size, int) else size[0]
    x = torch.randn(1, getattr(model.config, "num_channels", 3), size, size)
    return _trace(Classifier(model), (x,), ["pixel_values"], ["logits"], {"pixel_values": {0: "batch"}, "logits": {0: "batch"}})


def load_factory(spec: str):
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise UsageError(f"'{spec}': a factory is given as module:callable")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise BadInputError(f"'{spec}': cannot import module '{mod_name}': {exc}") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise BadInputError(f"'{spec}': module '{mod_name}' has no callable '{fn_name}'")
    return fn()


def export_factory(spec: str):
    import torch

    with step(f"building {spec}"):
        made = load_factory(spec)
    if isinstance(made, dict):
        d = dict(made)
    elif isinstance(made, tuple) and len(made) == 2:
        d = {"model": made[0], "inputs": made[1]}
    else:
        raise BadInputError(f"'{spec}' must return (torch_module, example_inputs) or a dict with 'model' and 'inputs'")
    module, inputs = d.get("model"), d.get("inputs")
    if not isinstance(module, torch.nn.Module):
        raise BadInputError(f"'{spec}' did not return a torch.nn.Module")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    inputs = tuple(inputs)
    names = d.get("input_names") or [f"input_{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    with torch.no_grad():
        probe = module.eval()(*inputs)
    n_out = len(probe) if isinstance(probe, (tuple, list)) else 1
    out_names = d.get("output_names") or ([f"output_{i}" for i in range(n_out)] if n_out > 1 else ["output"])
    axes = d.get("dynamic_axes") or {n: {0: "batch"} for n in [*names, *out_names]}
    with step(f"tracing {spec}"):
        model = _trace(module, inputs, names, out_names, axes)
    md.set_info(model, task=d.get("task", "custom"))
    return model
