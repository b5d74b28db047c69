"""The shift-add pass, the ai.shiftc::BcqMatMul op (function body, numpy and native references),
calibration, the compress API and CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import TOL_KV16, ort_run, run_cli
from shiftc import _native as nat
from shiftc.errors import EXIT_USAGE
from shiftc.passes import bcq, ops
from shiftc.passes.shiftadd import METADATA_KEY, ShiftAddConfig, ShiftAddPass

torch.set_num_threads(1)

# BcqMatMul: ONNX function body (ORT, float32 accumulation) vs numpy reference (float64) vs the
# native scalar reference (float64). Outputs are O(sqrt(K)·|α|) with x ~ N(0,1), |w| ~ 0.05.
RTOL_OP, ATOL_OP = 1e-5, 1e-5
# Whole model: ORT on the compressed graph vs ORT on the same graph with Ŵ written back as fp32.
RTOL_MODEL, ATOL_MODEL = 1e-4, 1e-4


def _op_model(x_shape, planes, exps, q, g, k, opset=17):
    node = helper.make_node("BcqMatMul", ["x", "planes", "exps"], ["y"], domain=ops.DOMAIN, bits=q,
                            group_size=g, in_features=k, coding="pm1")
    graph = helper.make_graph([node], "bcq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*x_shape[:-1], planes.shape[1]])],
                              [numpy_helper.from_array(planes, "planes"), numpy_helper.from_array(exps, "exps")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    ops.add_functions(m, ["BcqMatMul"])
    return m


def test_op_name_is_not_a_standard_onnx_op():
    assert not onnx.defs.has("BcqMatMul") and not onnx.defs.has("FdbMatMul")
    assert not onnx.defs.has("BcqGather") and not onnx.defs.has("QGather")
    assert set(ops.OPS) == {"BcqMatMul", "BcqGather", "QGather", "FdbMatMul", "UniformMatMul", "UniformGather"}
    assert ops.OPS["BcqMatMul"].reference is ops.bcq_matmul_ref
    assert ops.OPS["BcqGather"].kind == ops.OPS["QGather"].kind == "gather"


@pytest.mark.parametrize("q", [1, 2, 3, 4])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("mode", ["pow2", "pow2x2"])
def test_function_body_matches_references(q, g, mode, tmp_path):
    rng = np.random.default_rng(q * 100 + g)
    n, k = 24, 150  # K not a multiple of 32
    r = bcq.quantize_bcq(rng.standard_normal((n, k)).astype(np.float32) * 0.05, q, g, mode, iters=2)
    planes, exps = r.packed_planes(), r.exps
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    m = _op_model([2, 3, k], planes, exps, q, g, k)
    onnx.checker.check_model(m, full_check=True)
    path = str(tmp_path / "op.onnx")
    onnx.save(m, path)
    y_ort = ort_run(path, {"x": x})["y"]
    y_ref = ops.bcq_matmul_ref(x, planes, exps, bits=q, group_size=g, in_features=k)
    y_gemm = nat.bcq_gemm_ref(x.reshape(-1, k), planes, r.alpha, g, "pm1").reshape(2, 3, n)
    y_gemv = nat.bcq_gemv_ref(x[0, 0], planes, r.alpha, g, "pm1")
    np.testing.assert_allclose(y_ort, y_ref, rtol=RTOL_OP, atol=ATOL_OP)
    np.testing.assert_allclose(y_gemm, y_ref, rtol=RTOL_OP, atol=ATOL_OP)
    np.testing.assert_allclose(y_gemv, y_ref[0, 0], rtol=RTOL_OP, atol=ATOL_OP)
    np.testing.assert_allclose(y_ref, x @ r.dequantize().T, rtol=RTOL_OP, atol=ATOL_OP)


def _gather_model(idx_shape, planes, exps, q, g, k, opset=17):
    node = helper.make_node("BcqGather", ["ids", "planes", "exps"], ["y"], domain=ops.DOMAIN, bits=q,
                            group_size=g, in_features=k, coding="pm1")
    graph = helper.make_graph([node], "bcq_gather", [helper.make_tensor_value_info("ids", TensorProto.INT64, idx_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*idx_shape, k])],
                              [numpy_helper.from_array(planes, "planes"), numpy_helper.from_array(exps, "exps")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    ops.add_functions(m, ["BcqGather"])
    return m


@pytest.mark.parametrize("q,g,mode", [(1, 32, "pow2"), (3, 64, "pow2x2"), (4, 128, "pow2x2")])
def test_gather_function_body_matches_reference(q, g, mode, tmp_path):
    """BcqGather's function body (ORT) = rows of the numpy Ŵ = the BcqMatMul weight's rows, exactly
    (the same float32 sums of powers of two), negative indices counting from the end."""
    rng = np.random.default_rng(q + g)
    n, k = 40, 150
    r = bcq.quantize_bcq(rng.standard_normal((n, k)).astype(np.float32) * 0.05, q, g, mode, iters=2)
    ids = np.array([[0, 39, 7], [-1, 12, 12]], np.int64)
    m = _gather_model([2, 3], r.packed_planes(), r.exps, q, g, k)
    onnx.checker.check_model(m, full_check=True)
    path = str(tmp_path / "gather.onnx")
    onnx.save(m, path)
    y_ort = ort_run(path, {"ids": ids})["y"]
    y_ref = ops.bcq_gather_ref(ids, r.packed_planes(), r.exps, bits=q, group_size=g, in_features=k)
    assert y_ort.shape == (2, 3, k)
    np.testing.assert_array_equal(y_ort, y_ref)
    np.testing.assert_array_equal(y_ref, r.dequantize()[ids])


@pytest.mark.parametrize("q,g", [(2, 32), (4, 32), (4, 24), (8, 64)])
def test_qgather_function_body_matches_reference(q, g, tmp_path):
    """QGather's function body (ORT) = rows of the numpy Ŵ = scale·code + min, exactly; the
    reconstruction error is within half a step of each group's grid."""
    from shiftc.passes import uniform

    rng = np.random.default_rng(q * 10 + g)
    n, k = 40, 150  # K not a multiple of G or of 8/q
    w = rng.standard_normal((n, k)).astype(np.float32)
    c0, s0, m0 = uniform.quantize(w, q, g, iters=0)  # the min/max grid: within half a step
    w0 = uniform.dequantize(c0, s0, m0, q, g, k)
    step = np.repeat(s0.astype(np.float32), g, axis=1)[:, :k]
    assert np.all(np.abs(w0 - w) <= step / 2 + 1e-2 * step + 1e-3)  # float16 min and scale rounding
    codes, scales, mins = uniform.quantize(w, q, g)  # refined by least squares: never a larger error
    w_hat = uniform.dequantize(codes, scales, mins, q, g, k)
    assert ((w_hat - w) ** 2).sum() <= ((w0 - w) ** 2).sum()
    ids = np.array([[0, 39, 7], [-1, 12, 12]], np.int64)
    node = helper.make_node("QGather", ["ids", "codes", "scales", "mins"], ["y"], domain=ops.DOMAIN, bits=q,
                            group_size=g, in_features=k)
    graph = helper.make_graph([node], "qgather", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, k])],
                              [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scales, "scales"),
                               numpy_helper.from_array(mins, "mins")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    ops.add_functions(m, ["QGather"])
    onnx.checker.check_model(m, full_check=True)
    path = str(tmp_path / "qgather.onnx")
    onnx.save(m, path)
    y_ref = ops.qgather_ref(ids, codes, scales, mins, bits=q, group_size=g, in_features=k)
    np.testing.assert_array_equal(ort_run(path, {"ids": ids})["y"], y_ref)
    np.testing.assert_array_equal(y_ref, w_hat[ids])


def test_no_term_exponent_means_zero():
    planes = bcq.pack_planes(np.ones((1, 2, 32), np.uint8))
    exps = np.array([[[[bcq.NO_TERM]], [[0]]]], np.int8)  # row 0: α = 0; row 1: α = 1
    y = ops.bcq_matmul_ref(np.ones((1, 32), np.float32), planes, exps, bits=1, group_size=32, in_features=32)
    np.testing.assert_array_equal(y, [[0.0, 32.0]])


# -- the pass on graphs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_onnx(tiny_llama_dir, tmp_path_factory):
    import shiftc

    path = str(tmp_path_factory.mktemp("tiny_sa") / "tiny.onnx")
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


def test_pass_on_tiny_llama_with_calibration(tiny_onnx, smollm2_gguf_path, tmp_path):
    import shiftc.api

    out = str(tmp_path / "tiny3.onnx")
    rep = shiftc.api.compress(tiny_onnx, out, bits=3, group=32, layer_bits={"*.mlp.down_proj.*": 2},
                              calib="wikipedia", calib_windows=2, calib_window=32, tokenizer=smollm2_gguf_path, threads=1)
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    kinds = [n.op_type for n in m.graph.node]
    assert kinds.count("BcqMatMul") == 2 * 7 + 1  # 7 linear layers per block, plus the tied LM head
    assert kinds.count("MatMul") == 2 * 2  # attention scores and values stay
    names = {t.name for t in m.graph.initializer}
    # the embedding lookup reads a 4-bit table of its own; the fp32 table is gone
    assert "model.embed_tokens.weight" not in names and kinds.count("QGather") == 1 and "BcqGather" not in kinds
    emb = json.loads({p.key: p.value for p in m.metadata_props}[METADATA_KEY])["embedding"]
    assert emb["model.embed_tokens.weight"]["bits"] == 4 and emb["model.embed_tokens.weight"]["bits_per_weight"] == 5
    assert not any(nm.endswith(".weight.T") for nm in names)  # dead fp32 weights removed
    assert {(o.domain, o.version) for o in m.opset_import} >= {(ops.DOMAIN, 1)}
    meta = json.loads({p.key: p.value for p in m.metadata_props}[METADATA_KEY])
    assert meta["layers"]["model.layers.0.mlp.down_proj.weight.T"]["bits"] == 2
    assert meta["layers"]["lm_head"]["bits"] == 3 and meta["scale_mode"] == "pow2x2"  # the default
    assert rep["layers"]["lm_head"]["bits_per_weight"] == bcq.bits_per_weight(3, 32, "pow2x2")
    w = rep["weights"]  # bytes by kind: the 4-bit table is 49152 x 64 codes at 4 bits + 2 float16 per 32
    assert w["embedding tables"] == 49152 * (64 // 2 + 2 * 2 * (64 // 32))
    assert w["total"] == \
        w["quantized weights"] + w["embedding tables"] + w["other"]
    assert all(0 < e["rel_output_error"] < 1 for e in rep["layers"].values())
    ids = np.random.default_rng(0).integers(0, 49152, size=(1, 12)).astype(np.int64)
    ref_path = str(tmp_path / "ref.onnx")
    onnx.save(ops.dequantized_copy(m), ref_path)
    got, ref = ort_run(out, _feeds(m, ids))["logits"], ort_run(ref_path, _feeds(m, ids))["logits"]
    np.testing.assert_allclose(got, ref, rtol=RTOL_MODEL, atol=RTOL_MODEL * np.abs(ref).max())


def meta_tied(m):
    return json.loads({p.key: p.value for p in m.metadata_props}[METADATA_KEY]).get("tied_embedding")


def test_tied_embedding_reads_the_head_planes(tiny_onnx):
    m = onnx.load(tiny_onnx)
    out = ShiftAddPass(ShiftAddConfig(bits=2, group=64, iters=1, tied_embedding=True))(m).model
    kinds = [n.op_type for n in out.graph.node]
    assert kinds.count("BcqGather") == 1 and "QGather" not in kinds and meta_tied(out) == {"embed": "lm_head"}
    gather = next(n for n in out.graph.node if n.op_type == "BcqGather")
    assert list(gather.input[1:]) == ["lm_head.bcq_planes", "lm_head.bcq_exps"]
    assert "model.embed_tokens.weight" not in {t.name for t in out.graph.initializer}


def test_embedding_bits_zero_keeps_the_fp32_table(tiny_onnx):
    m = onnx.load(tiny_onnx)
    out = ShiftAddPass(ShiftAddConfig(bits=2, group=64, iters=1, embedding_bits=0))(m).model
    assert "model.embed_tokens.weight" in {t.name for t in out.graph.initializer}
    assert not any(n.op_type in ("BcqGather", "QGather") for n in out.graph.node) and meta_tied(out) is None


def test_sequential_calibration(tiny_onnx, smollm2_gguf_path):
    """Stage 1's H comes from the fp32 model (the pruned probe graph gives the same H as the full
    one); later stages see the earlier layers quantized; the pass takes the results as given."""
    from shiftc.passes.calibration import calibration_windows, collect_hessians, quantize_sequential

    model = onnx.load(tiny_onnx)
    sa = ShiftAddPass(ShiftAddConfig(bits=2, group=32, iters=1))
    targets = sa.match(model)[0]
    ids = calibration_windows(model, windows=2, window=16, tokenizer=smollm2_gguf_path)
    results, hs = quantize_sequential(model, targets, ids, sa.quantize, stages=3, threads=1)
    assert set(results) == {t.name for t in targets}
    inputs = list(dict.fromkeys(t.x for t in targets))
    ref = collect_hessians(model, inputs, ids, threads=1)
    assert set(hs) == set(ref)
    np.testing.assert_allclose(hs[inputs[0]], ref[inputs[0]], rtol=1e-5)  # stage 1: fp32 activations
    assert not np.allclose(hs[inputs[-1]], ref[inputs[-1]], rtol=1e-3)  # last stage: quantized prefix
    res = sa(model, hs, results=results)
    planes = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer if t.name.endswith(".bcq_planes")}
    np.testing.assert_array_equal(planes["lm_head.bcq_planes"], results["lm_head"].packed_planes())


def test_calibration_windows_at_most_takes_what_the_text_holds(tiny_onnx, smollm2_gguf_path):
    """Asking for more windows than the corpus holds is an error naming the count, unless
    ``at_most`` (distillation's default window count), which returns every whole window there is."""
    from shiftc.errors import UsageError
    from shiftc.passes.calibration import calibration_windows

    model = onnx.load(tiny_onnx)
    with pytest.raises(UsageError, match=r"--calib-windows 1000000: the lee/all text holds only \d+ windows of 64"):
        calibration_windows(model, corpus="lee", split="all", windows=10**6, window=64, tokenizer=smollm2_gguf_path)
    ids = calibration_windows(model, corpus="lee", split="all", windows=10**6, window=64, tokenizer=smollm2_gguf_path,
                              at_most=True)
    assert ids.shape[1] == 64 and 1 <= len(ids) < 10**6
    head = calibration_windows(model, corpus="lee", split="all", windows=3, window=64, tokenizer=smollm2_gguf_path)
    np.testing.assert_array_equal(head, ids[:3])


def test_process_pool_gives_the_same_results(tiny_onnx, smollm2_gguf_path, monkeypatch):
    """Layers quantized by a pool of spawned processes equal the in-process results bit for bit."""
    from shiftc.passes import shiftadd
    from shiftc.passes.calibration import calibration_windows, collect_hessians

    model = onnx.load(tiny_onnx)
    inits = {t.name: t for t in model.graph.initializer}
    ids = calibration_windows(model, windows=2, window=16, tokenizer=smollm2_gguf_path)
    base = ShiftAddPass(ShiftAddConfig(bits=3, group=32, iters=2, workers=1))
    targets = base.match(model)[0]
    hs = collect_hessians(model, [t.x for t in targets], ids, threads=1)
    one = base.quantize_all(targets, inits, hs)
    monkeypatch.setattr(shiftadd, "POOL_MIN_WEIGHTS", 0)
    two = ShiftAddPass(ShiftAddConfig(bits=3, group=32, iters=2, workers=2)).quantize_all(targets, inits, hs)
    assert set(one) == set(two) == {t.name for t in targets}
    for name in one:
        np.testing.assert_array_equal(one[name].codes, two[name].codes, err_msg=name)
        np.testing.assert_array_equal(one[name].exps, two[name].exps, err_msg=name)


def test_pass_skip_and_lm_head_off(tiny_onnx):
    model = onnx.load(tiny_onnx)
    cfg = ShiftAddConfig(bits=2, group=64, lm_head=False, skip=["*.k_proj.*"], iters=1)
    res = ShiftAddPass(cfg)(model)
    assert res.modified and len(res.report["layers"]) == 2 * 6
    reasons = " ".join(r for _, r in res.report["skipped"])
    assert "LM head" in reasons and "skip pattern" in reasons
    assert sum(n.op_type == "BcqMatMul" for n in model.graph.node) == 0  # the input is untouched


def test_pass_on_gemm_with_bias(tmp_path):
    rng = np.random.default_rng(7)
    w, b = rng.standard_normal((40, 96)).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 96])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 40])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    res = ShiftAddPass(ShiftAddConfig(bits=4, group=32))(m)
    onnx.checker.check_model(res.model, full_check=True)
    assert [n.op_type for n in res.model.graph.node] == ["BcqMatMul", "Add"]
    assert [t.name for t in res.model.graph.initializer] == ["b", "W.bcq_planes", "W.bcq_exps"]
    path = str(tmp_path / "g.onnx")
    onnx.save(res.model, path)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    planes, exps = (numpy_helper.to_array(t) for t in res.model.graph.initializer[1:])
    want = ops.bcq_matmul_ref(x, planes, exps, bits=4, group_size=32, in_features=96, bias=b)
    np.testing.assert_allclose(ort_run(path, {"x": x})["y"], want, rtol=RTOL_OP, atol=1e-4)


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_compress_json_and_recipe(tiny_onnx, tmp_path):
    out = str(tmp_path / "c.onnx")
    r = run_cli("compress", tiny_onnx, "-o", out, "--shiftadd-bits", "2", "--group", "64", "--calib", "none",
                "--scale-mode", "pow2x2", "--json", check=True)
    rep = json.loads(r.stdout)
    assert rep["path"] == out and rep["scale_mode"] == "pow2x2" and rep["group"] == 64
    assert rep["bits_per_weight"] == pytest.approx(bcq.bits_per_weight(2, 64, "pow2x2"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("shiftadd:\n  bits: 3\n  group: 32\n  lm_head: false\ncalib:\n  corpus: none\n")
    rep = json.loads(run_cli("compress", tiny_onnx, "-o", out, "--recipe", str(recipe), "--json", check=True).stdout)
    assert "lm_head" not in rep["layers"] and rep["group"] == 32
    assert all(e["bits"] == 3 for e in rep["layers"].values())


@pytest.mark.parametrize("flags,flag", [(["--shiftadd-bits", "0"], "--shiftadd-bits"), (["--shiftadd-bits", "5"], "--shiftadd-bits"),
                                        (["--group", "48"], "--group"), (["--scale-mode", "pow3"], "--scale-mode"),
                                        (["--bits", "3"], "--bits")])  # no prefix match to --bits-budget
def test_cli_bad_flags(tiny_onnx, tmp_path, flags, flag):
    r = run_cli("compress", tiny_onnx, "-o", str(tmp_path / "x.onnx"), *flags)
    assert r.returncode == EXIT_USAGE and flag in r.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_cli_bad_recipe(tiny_onnx, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("shiftadd:\n  bitz: 3\n")
    r = run_cli("compress", tiny_onnx, "-o", str(tmp_path / "x.onnx"), "--recipe", str(recipe))
    assert r.returncode == EXIT_USAGE and "shiftadd.bitz" in r.stderr and str(recipe) in r.stderr
    recipe.write_text("shiftadd:\n  group: 40\n")
    r = run_cli("compress", tiny_onnx, "-o", str(tmp_path / "x.onnx"), "--recipe", str(recipe))
    assert r.returncode == EXIT_USAGE and "--group" in r.stderr


TOL_COMPILED_BCQ = TOL_KV16  # compiled (lut16 kernels, float16 KV cache) vs ORT function bodies


def test_compressed_model_compiles_and_matches_onnxruntime(tiny_onnx, tmp_path):
    """A shift-add model compiles (BcqMatMul lowered by the backend's converter registry) and its
    compiled logits equal ONNX Runtime running the op's function body."""
    import shiftc
    import shiftc.api

    out, lib = str(tmp_path / "tiny_sa.onnx"), str(tmp_path / "tiny_sa.so")
    shiftc.api.compress(tiny_onnx, out, bits=2, group=32, calib="none")
    shiftc.compile(out, lib)
    ids = np.random.default_rng(1).integers(0, 49152, size=(1, 9))
    sc, sr = shiftc.load(lib).lm_session(), shiftc.load(out).lm_session()
    for chunk in (ids, np.array([[7]]), np.array([[4000]])):
        np.testing.assert_allclose(sc.step(chunk), sr.step(chunk), rtol=TOL_COMPILED_BCQ[0], atol=TOL_COMPILED_BCQ[1])


def test_layer_damp_reaches_each_layers_fit(tiny_onnx, tmp_path, monkeypatch):
    """layer_damp ({name or glob: damp}) sets GPTQ's damping per layer (a tied head damped more
    keeps its rows, which the embedding reads, closer to the weights); bad values are refused."""
    from shiftc.passes import shiftadd
    from shiftc.passes.recipe import load_recipe

    seen = {}
    fit = shiftadd.fit_layer

    def spy(w, h, bits, group, **kw):
        seen[w.shape] = seen.get(w.shape, set()) | {kw["damp"]}
        return fit(w, h, bits, group, **kw)

    monkeypatch.setattr(shiftadd, "fit_layer", spy)
    m = onnx.load(tiny_onnx)
    cfg = shiftadd.ShiftAddConfig(scale_mode="uniform", bits=3, group=32, tied_embedding=True, workers=1,
                                  layer_damp={"lm_head": 0.5})
    shiftadd.ShiftAddPass(cfg)(m, None)
    head = [shape for shape in seen if shape[0] == 49152]
    assert len(head) == 1 and seen.pop(head[0]) == {0.5}
    assert seen and all(d == {cfg.damp} for d in seen.values())
    recipe = tmp_path / "r.yaml"
    recipe.write_text("shiftadd:\n  scale_mode: uniform\n  layer_damp: {lm_head: 0.1}\n")
    assert load_recipe(str(recipe)).shiftadd.layer_damp == {"lm_head": 0.1}
    recipe.write_text("shiftadd:\n  layer_damp: {lm_head: -1}\n")
    r = run_cli("compress", tiny_onnx, "-o", str(tmp_path / "x.onnx"), "--recipe", str(recipe))
    assert r.returncode == EXIT_USAGE and "layer_damp 'lm_head'" in r.stderr
