"""Decoder graphs from other exporters (shiftc/frontend/foreign.py): the model matrix.

Every family of tests/families.py exported by PyTorch's exporter (dynamo), and Llama, Qwen2 and
GPT-2 by Hugging Face optimum (with KV-cache inputs), brought into shiftc's form: the result must
be *the same graph* shiftc export writes from the Hugging Face folder (same nodes, bit-identical
weights), so everything checked for that graph (tests/test_backend_correctness.py: logits and
KV-cache decode vs torch, left padding, 3-bit compress + compile per family) holds for the
foreign file. A few cells are also run end to end from the foreign file itself.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import families
import shiftc
from conftest import TOL_KV16, assert_close, require
from families import FAMILIES
from shiftc.errors import BadInputError, UnsupportedError, UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIMUM_PY = os.path.join(ROOT, ".venv-optimum", "bin", "python")
OPTIMUM_FAMILIES = ("llama", "qwen2", "gpt2")


def _dynamo_dir(tmp_path_factory, family: str):
    d = tmp_path_factory.mktemp(f"dynamo_{family}")
    model = families.build(family)
    model.save_pretrained(d / "hf")
    families.dynamo_export(model, str(d / "hf" / "model.onnx"))  # beside its config.json, as a user would
    return model, d


@pytest.fixture(scope="module")
def optimum_exports(tmp_path_factory):
    """OUT/<family>/{hf, onnx/model.onnx} written by optimum in its side venv (make test builds it)."""
    require(os.path.exists(OPTIMUM_PY), "the optimum side venv (.venv-optimum) is missing: run `make test`, "
                                        "which builds it")
    out = tmp_path_factory.mktemp("optimum")
    subprocess.run([OPTIMUM_PY, os.path.join(ROOT, "tests", "optimum_export.py"), str(out), *OPTIMUM_FAMILIES],
                   check=True, capture_output=True, timeout=600)
    return out


def _assert_same_graph(got_path: str, want_path: str) -> None:
    """The same nodes in the same order, the same initializers bit for bit, the same decoder record."""
    got, want = onnx.load(got_path), onnx.load(want_path)
    sig = lambda m: [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node]  # noqa: E731
    assert sig(got) == sig(want)
    gi = {i.name: numpy_helper.to_array(i) for i in got.graph.initializer}
    wi = {i.name: numpy_helper.to_array(i) for i in want.graph.initializer}
    assert sorted(gi) == sorted(wi)
    for name, w in wi.items():
        assert gi[name].dtype == w.dtype and np.array_equal(gi[name], w), f"initializer {name} differs"
    assert shiftc.inspect(got_path)["decoder"] == shiftc.inspect(want_path)["decoder"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamo_export_becomes_shiftc_graph(family, tmp_path_factory):
    _, d = _dynamo_dir(tmp_path_factory, family)
    own, canon = str(d / "own.onnx"), str(d / "canonical.onnx")
    shiftc.export(str(d / "hf"), own)
    shiftc.export(str(d / "hf" / "model.onnx"), canon)
    _assert_same_graph(canon, own)


@pytest.mark.parametrize("family", OPTIMUM_FAMILIES)
def test_optimum_export_becomes_shiftc_graph(family, optimum_exports, tmp_path):
    d = optimum_exports / family
    own, canon = str(tmp_path / "own.onnx"), str(tmp_path / "canonical.onnx")
    shiftc.export(str(d / "hf"), own)
    shiftc.export(str(d / "onnx" / "model.onnx"), canon)  # optimum writes config.json beside it
    _assert_same_graph(canon, own)


def _compile_and_decode_matches_torch(foreign: str, model, tmp_path) -> None:
    """``shiftc compile`` on the foreign file itself: in-place cache, prefill + two decode steps equal
    torch's logits; then 3-bit shift-add from the foreign file compiles and matches ONNX Runtime."""
    lib = str(tmp_path / "foreign.so")
    shiftc.compile(foreign, lib, kv_dtype="float32")
    m = shiftc.load(lib)
    assert m.task == "causal-lm" and m.meta["kv_cache"]["mode"] == "inplace"
    families.steps_match_torch(model, lib, (1e-4, 2e-4))
    families.compressed_matches_onnx_runtime(foreign, tmp_path, "float16", TOL_KV16)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_dynamo_file_compiles_and_compresses(family, tmp_path_factory, tmp_path):
    model, d = _dynamo_dir(tmp_path_factory, family)
    _compile_and_decode_matches_torch(str(d / "hf" / "model.onnx"), model, tmp_path)


def test_optimum_file_with_cache_inputs_compiles_and_compresses(optimum_exports, tmp_path):
    import torch
    from transformers import GPT2LMHeadModel

    d = optimum_exports / "gpt2"
    model = GPT2LMHeadModel.from_pretrained(str(d / "hf"), dtype=torch.float32).eval()
    _compile_and_decode_matches_torch(str(d / "onnx" / "model.onnx"), model, tmp_path)


def test_dynamo_encoder_compiles_through_its_weights(tmp_path):
    """A BERT encoder from PyTorch's exporter (whose attention-mask arithmetic TVM's importer cannot
    shape) with its config.json beside it: re-exported from the weights read back, compiled, and
    equal to torch's last_hidden_state on a padded batch."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(11)
    model = BertModel(BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=128)).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "LayerNorm" in name:
                prm.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    families.dynamo_export(model, str(tmp_path / "model.onnx"), output="last_hidden_state")
    lib = str(tmp_path / "bert.so")
    shiftc.compile(str(tmp_path / "model.onnx"), lib)
    ids = torch.tensor([[1, 50, 60, 70, 80, 2], [1, 90, 100, 2, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    got = shiftc.load(lib).run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["last_hidden_state"]
    real = mask.numpy().astype(bool)
    assert_close(got[real], ref[real], rtol=1e-4, atol=1e-4, what="dynamo BERT compiled vs torch")


# -- refusals ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dynamo_llama(tmp_path_factory):
    return _dynamo_dir(tmp_path_factory, "llama")[1]


def test_a_config_that_does_not_describe_the_graph_is_refused(dynamo_llama, tmp_path):
    """Another rope base: every weight is found, but the logits differ; refused with the difference."""
    import json

    cfg = json.loads((dynamo_llama / "hf" / "config.json").read_text())
    cfg["rope_theta"] = 500000.0
    cfg.setdefault("rope_parameters", {})["rope_theta"] = 500000.0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="logits differ .* will not compile it as a guess"):
        shiftc.export(str(dynamo_llama / "hf" / "model.onnx"), str(tmp_path / "x.onnx"), config=str(tmp_path))
    assert not (tmp_path / "x.onnx").exists()


def test_another_family_config_is_refused_by_parameter(dynamo_llama, tmp_path):
    families.build("qwen2").config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedError, match=r"parameter\(s\) of the qwen2 model were not found .*q_proj.bias"):
        shiftc.export(str(dynamo_llama / "hf" / "model.onnx"), str(tmp_path / "x.onnx"), config=str(tmp_path))


def test_a_foreign_graph_without_its_config_names_the_flag(dynamo_llama, tmp_path):
    lone = tmp_path / "lonely.onnx"
    lone.write_bytes((dynamo_llama / "hf" / "model.onnx").read_bytes())
    with pytest.raises(BadInputError, match="no config.json beside it .*--config"):
        shiftc.compile(str(lone), str(tmp_path / "x.so"))
    r = subprocess.run([sys.executable, "-m", "shiftc", "export", str(lone), "-o", str(tmp_path / "x.onnx")],
                       capture_output=True, text=True)
    assert r.returncode == 3 and "--config" in r.stderr
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.so").exists()


def test_export_of_a_shiftc_graph_or_a_non_decoder_is_a_usage_error(dynamo_llama, tmp_path):
    own = str(tmp_path / "own.onnx")
    shiftc.export(str(dynamo_llama / "hf"), own)
    with pytest.raises(UsageError, match="not a language-model graph from another exporter"):
        shiftc.export(own, str(tmp_path / "again.onnx"))
    with pytest.raises(UsageError, match="--config applies to an .onnx source"):
        shiftc.export(str(dynamo_llama / "hf"), str(tmp_path / "x.onnx"), config=str(dynamo_llama / "hf"))
    with pytest.raises(UsageError, match="--task encoder"):
        shiftc.export(str(dynamo_llama / "hf" / "model.onnx"), str(tmp_path / "x.onnx"), task="encoder")
