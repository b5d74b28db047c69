"""The binarize pass (constant-weight MatMul/Gemm -> ai.shiftc::FdbMatMul), its compress API,
CLI and recipe entries, and a binarized decoder compiled vs ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import TOL_KV16, ort_run
from shiftc import cli
from shiftc.errors import EXIT_USAGE
from shiftc.passes import fdb, ops
from shiftc.passes.binarize import BinarizeConfig, BinarizePass, dequantized_copy
from shiftc.passes.shiftadd import METADATA_KEY

torch.set_num_threads(1)

# Whole model: ORT on the function bodies vs ORT on the same graph with Ŵ written back as fp32.
RTOL_MODEL = 1e-4
# Compiled (lut16 kernels, coding "01" + offsets, float16 KV cache) vs ORT function bodies, logits of
# the tiny decoder: the cache's rounding dominates (conftest.TOL_KV16)
TOL_COMPILED = TOL_KV16


@pytest.fixture(scope="module")
def tiny_onnx(tiny_llama_dir, tmp_path_factory):
    import shiftc

    path = str(tmp_path_factory.mktemp("tiny_bin") / "tiny.onnx")
    shiftc.export(tiny_llama_dir, path)
    return path


def _feeds(model, ids):
    dec = json.loads({p.key: p.value for p in model.metadata_props}["shiftc.decoder"])
    s = ids.shape[1]
    f = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(s, dtype=np.int64)[None]}
    for i in range(dec["num_layers"]):
        for kv in ("key", "value"):
            f[f"past_key_values.{i}.{kv}"] = np.zeros((1, dec["num_kv_heads"], 0, dec["head_dim"]), np.float32)
    return f


def run_cli(capsys, *args):
    """The CLI in this process (a subprocess would re-import torch and TVM: seconds per call)."""
    capsys.readouterr()
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_pass_with_hessians_matches_its_dequantized_copy(tiny_onnx, tmp_path):
    """GPTQ path (H per layer input) and the function bodies: ORT logits on FdbMatMul equal ORT on
    the same graph with Ŵ written back as fp32."""
    model = onnx.load(tiny_onnx)
    bp = BinarizePass(BinarizeConfig(group=32, iters=2, lm_head=False))  # the head: test_cli_and_recipe
    targets, _ = bp.match(model)
    rng = np.random.default_rng(0)
    hs = {}
    for t in targets:
        k = 128 if "down_proj" in t.name else 64
        x = rng.standard_normal((256, k))
        hs[t.x] = x.T @ x
    res = bp(model, hs)
    out, ref = str(tmp_path / "fdb.onnx"), str(tmp_path / "deq.onnx")
    onnx.save(res.model, out)
    onnx.save(dequantized_copy(res.model), ref)
    assert all(0 < e["rel_output_error"] < 1 for e in res.report["layers"].values())
    ids = np.random.default_rng(0).integers(0, 49152, size=(1, 12)).astype(np.int64)
    got, want = ort_run(out, _feeds(res.model, ids))["logits"], ort_run(ref, _feeds(res.model, ids))["logits"]
    np.testing.assert_allclose(got, want, rtol=RTOL_MODEL, atol=RTOL_MODEL * np.abs(want).max())


@pytest.mark.slow
def test_api_binarize_with_calibration(tiny_onnx, smollm2_gguf_path, tmp_path):
    import shiftc

    out = str(tmp_path / "fdb.onnx")
    rep = shiftc.compress(tiny_onnx, out, binarize="fdb", group=32, calib="wikipedia", calib_windows=2,
                          calib_window=32, tokenizer=smollm2_gguf_path, threads=1)
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    kinds = [n.op_type for n in m.graph.node]
    assert kinds.count("FdbMatMul") == 2 * 7 + 1 and "BcqMatMul" not in kinds  # 7 linears per block + LM head
    assert kinds.count("QGather") == 1  # the embedding's own 4-bit table; the fp32 one is gone
    assert not any(t.name.endswith(".weight.T") or t.name == "model.embed_tokens.weight" for t in m.graph.initializer)
    meta = json.loads({p.key: p.value for p in m.metadata_props}[METADATA_KEY])
    assert meta["pass"] == "binarize" and meta["mode"] == "fdb" and meta["op"] == "ai.shiftc::FdbMatMul"
    assert rep["bits_per_weight"] == pytest.approx(fdb.bits_per_weight(2, 32))
    assert all(0 < e["rel_output_error"] < 1 for e in rep["layers"].values())
    scales = {t.name: t for t in m.graph.initializer}["model.layers.0.mlp.down_proj.fdb_scales"]
    assert scales.data_type == TensorProto.FLOAT16
    ids = np.random.default_rng(0).integers(0, 49152, size=(1, 12)).astype(np.int64)
    ref = str(tmp_path / "deq.onnx")
    onnx.save(dequantized_copy(m), ref)
    got, want = ort_run(out, _feeds(m, ids))["logits"], ort_run(ref, _feeds(m, ids))["logits"]
    np.testing.assert_allclose(got, want, rtol=RTOL_MODEL, atol=RTOL_MODEL * np.abs(want).max())


def test_pass_1bit_skip_lm_head_off(tiny_onnx):
    model = onnx.load(tiny_onnx)
    res = BinarizePass(BinarizeConfig(mode="1bit", group=64, lm_head=False, skip=["*.k_proj.*"], iters=1))(model)
    assert res.modified and len(res.report["layers"]) == 2 * 6
    assert all(e["bits"] == 1 for e in res.report["layers"].values())
    reasons = " ".join(r for _, r in res.report["skipped"])
    assert "LM head" in reasons and "skip pattern" in reasons
    assert sum(n.op_type == "FdbMatMul" for n in model.graph.node) == 0  # input untouched


def test_pass_on_gemm_with_bias(tmp_path):
    rng = np.random.default_rng(7)
    w, b = rng.standard_normal((40, 96)).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 96])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 40])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    res = BinarizePass(BinarizeConfig(group=32))(m)
    onnx.checker.check_model(res.model, full_check=True)
    assert [n.op_type for n in res.model.graph.node] == ["FdbMatMul", "Add"]
    path = str(tmp_path / "g.onnx")
    onnx.save(res.model, path)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    p, s, o = (numpy_helper.to_array(t) for t in res.model.graph.initializer[1:])
    want = ops.fdb_matmul_ref(x, p, s, o, bits=2, group_size=32, in_features=96, bias=b)
    np.testing.assert_allclose(ort_run(path, {"x": x})["y"], want, rtol=1e-5, atol=1e-4)


def test_cli_and_recipe(tiny_onnx, tmp_path, capsys):
    out = str(tmp_path / "c.onnx")
    code, stdout, err = run_cli(capsys, "compress", tiny_onnx, "-o", out, "--binarize", "1bit", "--group", "64",
                                "--calib", "none", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["pass"] == "binarize" and rep["mode"] == "1bit" and rep["group"] == 64
    assert rep["bits_per_weight"] == pytest.approx(fdb.bits_per_weight(1, 64))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("binarize:\n  mode: fdb\n  group: 32\n  lm_head: false\ncalib:\n  corpus: none\n")
    code, stdout, err = run_cli(capsys, "compress", tiny_onnx, "-o", out, "--recipe", str(recipe), "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["mode"] == "fdb" and rep["group"] == 32 and "lm_head" not in rep["layers"]


@pytest.mark.parametrize("flags,flag", [(["--binarize", "2bit"], "--binarize"),
                                        (["--binarize", "fdb", "--shiftadd-bits", "2"], "--shiftadd-bits"),
                                        (["--binarize", "fdb", "--group", "48"], "--group")])
def test_cli_bad_flags(tiny_onnx, tmp_path, capsys, flags, flag):
    try:
        code, _, err = run_cli(capsys, "compress", tiny_onnx, "-o", str(tmp_path / "x.onnx"), *flags, "--calib", "none")
    except SystemExit as e:  # argparse refuses a bad choice itself
        code, err = e.code, capsys.readouterr().err
    assert code == EXIT_USAGE and flag in err
    assert not (tmp_path / "x.onnx").exists()


def test_bad_recipe(tiny_onnx, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("binarize:\n  mode: 3bit\n")
    code, _, err = run_cli(capsys, "compress", tiny_onnx, "-o", str(tmp_path / "x.onnx"), "--recipe", str(recipe))
    assert code == EXIT_USAGE and "--binarize" in err and str(recipe) in err
    recipe.write_text("binarize:\n  mode: fdb\nshiftadd:\n  bits: 2\n")
    code, _, err = run_cli(capsys, "compress", tiny_onnx, "-o", str(tmp_path / "x.onnx"), "--recipe", str(recipe))
    assert code == EXIT_USAGE and "--binarize" in err


@pytest.mark.slow
def test_binarized_model_compiles_and_matches_onnxruntime(tiny_onnx, tmp_path):
    import shiftc

    out, lib = str(tmp_path / "tiny_fdb.onnx"), str(tmp_path / "tiny_fdb.so")
    shiftc.compress(tiny_onnx, out, binarize="fdb", group=32, calib="none")
    shiftc.compile(out, lib)
    ids = np.random.default_rng(1).integers(0, 49152, size=(1, 9))
    sc, sr = shiftc.load(lib).lm_session(), shiftc.load(out).lm_session()
    for chunk in (ids, np.array([[7]]), np.array([[4000]])):
        np.testing.assert_allclose(sc.step(chunk), sr.step(chunk), rtol=TOL_COMPILED[0], atol=TOL_COMPILED[1])
