"""The shift-add pass's uniform grids (scale_mode "uniform"): the fit, ai.shiftc::UniformMatMul /
UniformGather (function bodies, numpy reference, backend lowering) and the tied one-copy model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import TOL_KV16, ort_run, run_cli
from shiftc.errors import EXIT_USAGE
from shiftc.passes import bcq, ops, uniform
from shiftc.passes.shiftadd import METADATA_KEY, ShiftAddConfig, ShiftAddPass

# Function body (ORT, float32) vs the numpy reference (float64): outputs O(sqrt(K)) with x ~ N(0, 1).
RTOL_OP, ATOL_OP = 1e-5, 1e-5
# Compiled library (lut16 kernels, float32 sums in another order) vs ORT on the same graph.
RTOL_COMPILED, ATOL_COMPILED = TOL_KV16  # compiled decoder (float16 KV cache) vs ORT function bodies


def _grid_weights(rng, n, k, g, q):
    """Weights that sit exactly on a q-bit grid with float16 scale and min per group, every group
    using codes 0 and 2^q − 1 (so its min/max range is the grid's)."""
    ng = -(-k // g)
    s = rng.uniform(0.01, 0.05, (n, ng)).astype(np.float16)
    m = (-rng.uniform(0.1, 0.3, (n, ng))).astype(np.float16)
    c = rng.integers(0, 2**q, (n, k)).astype(np.uint8)
    c[:, ::g], c[:, 1::g] = 0, 2**q - 1
    return uniform.grid_weight(c, s, m, g), c


@pytest.mark.parametrize("q,g", [(2, 32), (4, 32), (3, 64)])
def test_fit_recovers_a_grid_exactly(q, g):
    """A weight already on a q-bit float16 grid (a 4-bit checkpoint re-quantized at 4 bits) comes
    back exactly, with and without error compensation."""
    rng = np.random.default_rng(q + g)
    w, codes = _grid_weights(rng, 24, 150, g, q)
    x = rng.standard_normal((256, 150)).astype(np.float32)
    for h in (None, x.T @ x):
        r = uniform.quantize_grid_gptq(w, h, q, g)
        np.testing.assert_array_equal(r.dequantize(), w)
        np.testing.assert_array_equal(r.codes, codes)


def test_compensation_lowers_the_output_error():
    """GPTQ on the uniform grid: lower output error than fitting each group on its own, which in
    turn beats plain round-to-nearest on the min/max grid."""
    rng = np.random.default_rng(3)
    n, k = 64, 256
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((1024, k)).astype(np.float32) * np.linspace(0.2, 3, k, dtype=np.float32)
    x = x @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32)  # correlated columns
    h = x.T @ x
    comp = bcq.relative_output_error(w, uniform.quantize_grid_gptq(w, h, 3, 32).dequantize(), h)
    plain = bcq.relative_output_error(w, uniform.quantize_grid_gptq(w, None, 3, 32).dequantize(), h)
    assert comp < 0.85 * plain
    assert plain < bcq.relative_output_error(w, bcq.quantize_rtn(w, 3, 32), h)


def _op_model(op, x_info, y_shape, r, q, g, k):
    node = helper.make_node(op, ["x", "planes", "scales", "mins"], ["y"], domain=ops.DOMAIN, bits=q,
                            group_size=g, in_features=k)
    graph = helper.make_graph([node], op, [x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(r.packed_planes(), "planes"),
                               numpy_helper.from_array(r.scales, "scales"), numpy_helper.from_array(r.mins, "mins")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    ops.add_functions(m, [op])
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.mark.parametrize("q,g", [(1, 32), (3, 64), (4, 32)])
def test_function_bodies_match_references(q, g, tmp_path):
    """UniformMatMul's body (ORT) = X·Ŵᵀ of the numpy reference; UniformGather's = Ŵ's rows, exactly."""
    rng = np.random.default_rng(10 * q + g)
    n, k = 40, 150  # K not a multiple of G or 32
    r = uniform.quantize_grid_gptq(rng.standard_normal((n, k)).astype(np.float32), None, q, g)
    args = (r.packed_planes(), r.scales, r.mins)
    kw = dict(bits=q, group_size=g, in_features=k)
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    path = str(tmp_path / "mm.onnx")
    onnx.save(_op_model("UniformMatMul", helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k]), [2, 5, n],
                        r, q, g, k), path)
    np.testing.assert_allclose(ort_run(path, {"x": x})["y"], ops.uniform_matmul_ref(x, *args, **kw),
                               rtol=RTOL_OP, atol=ATOL_OP)
    ids = np.array([[0, 39, 7], [-1, 12, 12]], np.int64)
    path = str(tmp_path / "gather.onnx")
    onnx.save(_op_model("UniformGather", helper.make_tensor_value_info("x", TensorProto.INT64, [2, 3]), [2, 3, k],
                        r, q, g, k), path)
    y_ref = ops.uniform_gather_ref(ids, *args, **kw)
    np.testing.assert_array_equal(ort_run(path, {"x": ids})["y"], y_ref)
    np.testing.assert_array_equal(y_ref, r.dequantize()[ids])


def test_compact_scale_layout_matches_native_packer():
    """pack_uniform (numpy statement of bcq_lut.h's [NB][NG][2][16] halves) = the C packer."""
    from shiftc import _native as nat
    from shiftc.backend.shiftc_ops import pack_uniform

    rng = np.random.default_rng(5)
    n, ng = 37, 5
    s, m = rng.standard_normal((n, ng)).astype(np.float16), rng.standard_normal((n, ng)).astype(np.float16)
    got = np.asarray(nat.bcq_pack_uniform(s, m, ng * 32, 32)).view(np.float16)
    np.testing.assert_array_equal(got, pack_uniform(s, m))
    blocks = pack_uniform(s, m).reshape(-1, ng, 2, 16)  # [NB][NG][2][16]
    np.testing.assert_array_equal(blocks[1, 3, 0, 4], s[20, 3])
    np.testing.assert_array_equal(blocks[1, 3, 1, 4], m[20, 3])
    assert not blocks[2, :, :, 5:].any()  # rows 37.. are padding


@pytest.fixture(scope="module")
def tiny_onnx(tiny_llama_dir, tmp_path_factory):
    import shiftc

    path = str(tmp_path_factory.mktemp("tiny_uq") / "tiny.onnx")
    shiftc.export(tiny_llama_dir, path)
    return path


def test_pass_writes_uniform_ops_and_one_tied_copy(tiny_onnx):
    m = onnx.load(tiny_onnx)
    out = ShiftAddPass(ShiftAddConfig(bits=4, group=32, scale_mode="uniform", tied_embedding=True))(m).model
    kinds = [n.op_type for n in out.graph.node]
    assert "BcqMatMul" not in kinds and kinds.count("UniformGather") == 1 and "QGather" not in kinds
    assert kinds.count("UniformMatMul") == 2 * 7 + 1  # 7 matrices per layer, 2 layers, the head
    gather = next(n for n in out.graph.node if n.op_type == "UniformGather")
    assert list(gather.input[1:]) == ["lm_head.uq_planes", "lm_head.uq_scales", "lm_head.uq_mins"]
    names = {t.name for t in out.graph.initializer}
    assert "model.embed_tokens.weight" not in names
    meta = json.loads({p.key: p.value for p in out.metadata_props}[METADATA_KEY])
    assert meta["op"] == "ai.shiftc::UniformMatMul" and meta["scale_mode"] == "uniform"
    assert meta["bits_per_weight"] == pytest.approx(4 + 32 / 32)
    # the bytes the ONNX file holds for the matrices: 4 bits + two float16 per 32 weights
    by_kind = ops.bytes_by_kind(out)
    n_weights = meta["quantized_weights"]
    assert by_kind["quantized weights"] == pytest.approx(n_weights * 5 / 8, rel=0.02)


def test_compiled_uniform_model_matches_onnxruntime(tiny_onnx, tmp_path):
    """The compiled library (lut16 codes + compact scales, the tied lookup from the same constants)
    gives ORT's logits on prefill and decode steps (both kernel paths: tables and GEMM)."""
    import shiftc

    out, lib = str(tmp_path / "u.onnx"), str(tmp_path / "u.so")
    res = ShiftAddPass(ShiftAddConfig(bits=3, group=32, scale_mode="uniform", tied_embedding=True))(onnx.load(tiny_onnx))
    onnx.save(res.model, out)
    shiftc.compile(out, lib)
    ids = np.random.default_rng(1).integers(0, 49152, size=(1, 20))
    sc, sr = shiftc.load(lib).lm_session(), shiftc.load(out).lm_session()
    for chunk in (ids, np.array([[7]]), np.array([[4000]])):
        np.testing.assert_allclose(sc.step(chunk), sr.step(chunk), rtol=RTOL_COMPILED, atol=ATOL_COMPILED)


# The default int8 GEMV tables on AVX2 / AVX-512 (bcq_lut.h) against ORT's float32 function bodies on
# decode steps of the tiny 3-bit model: each matmul's lookups are rounded to 8 bits per group of
# columns (relative error about 2^-9 per lookup); measured worst 6.0e-3 of the logits' scale on
# this model (float32 tables: 5e-5), held to 5x that
TOL_T8_LOGITS = 0.03


def test_compiled_uniform_int8_tables_default(tiny_onnx, tmp_path):
    """A compiled uniform model decodes on int8 tables by default (a fresh process, no
    SHIFTC_LUT_TABLES): close to ORT at TOL_T8_LOGITS, and not identical to the float32 tables."""
    import os
    import subprocess
    import sys

    import shiftc
    from shiftc import _native as nat

    try:
        nat.bcq_set_isa("avx2")
    except ValueError:
        pytest.skip("the int8 GEMV tables are AVX2 / AVX-512 kernels; this CPU has neither")
    finally:
        nat.bcq_set_isa("auto")
    out, lib = str(tmp_path / "u.onnx"), str(tmp_path / "u.so")
    res = ShiftAddPass(ShiftAddConfig(bits=3, group=64, scale_mode="uniform", tied_embedding=True))(onnx.load(tiny_onnx))
    onnx.save(res.model, out)
    shiftc.compile(out, lib)
    script = (
        "import sys, numpy as np, shiftc\n"
        "s = shiftc.load(sys.argv[1]).lm_session()\n"
        "ids = np.random.default_rng(1).integers(0, 49152, size=(1, 20))\n"
        "s.step(ids)\n"
        "np.save(sys.argv[2], np.concatenate([s.step(np.array([[t]]))[0] for t in (7, 4000, 123)]))\n"
    )
    got = {}
    for mode in ("int8", "float32"):
        env = {k: v for k, v in os.environ.items() if k != "SHIFTC_LUT_TABLES"}
        if mode == "float32":
            env["SHIFTC_LUT_TABLES"] = "float32"
        dst = str(tmp_path / f"{mode}.npy")
        subprocess.run([sys.executable, "-c", script, lib, dst], check=True, env=env, timeout=300)
        got[mode] = np.load(dst)
    sr = shiftc.load(out).lm_session()
    sr.step(np.random.default_rng(1).integers(0, 49152, size=(1, 20)))
    ref = np.concatenate([sr.step(np.array([[t]]))[0] for t in (7, 4000, 123)])
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got["float32"], ref, rtol=RTOL_COMPILED, atol=ATOL_COMPILED)
    assert not np.array_equal(got["int8"], got["float32"]), "int8 tables were not the default"
    err = np.abs(got["int8"] - ref).max() / scale
    assert err <= TOL_T8_LOGITS, f"int8 tables: worst logit error {err:.3g} of the logits' scale"


def test_uniform_with_distillation_is_refused(tiny_onnx, tmp_path):
    r = run_cli("compress", tiny_onnx, "-o", str(tmp_path / "x.onnx"), "--scale-mode", "uniform",
                "--distill-steps", "5", "--calib", "none")
    assert r.returncode == EXIT_USAGE and "--distill-steps" in r.stderr
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("scale_mode", ["uniform", "pow2x2"])
def test_same_input_matmuls_fuse_into_one_call(tiny_onnx, tmp_path, scale_mode):
    """backend/fuse_matmuls: q/k/v and gate/up become one node each plus a Split (2 + 1 nodes fewer
    per layer), the tied head stays apart, and ONNX Runtime gives the same logits on the rewritten
    graph (the rows of every weight are unchanged)."""
    from shiftc.backend import fuse_matmuls

    cfg = ShiftAddConfig(bits=3, group=32, scale_mode=scale_mode, tied_embedding=True, iters=1)
    m = ShiftAddPass(cfg)(onnx.load(tiny_onnx)).model
    fused, removed = fuse_matmuls.rewrite(m)
    assert removed == 2 * 3
    op = "UniformMatMul" if scale_mode == "uniform" else "BcqMatMul"
    assert [n.op_type for n in fused.graph.node].count(op) == [n.op_type for n in m.graph.node].count(op) - removed
    assert [n.op_type for n in fused.graph.node].count("Split") == [n.op_type for n in m.graph.node].count("Split") + 2 * 2
    assert fuse_matmuls.rewrite(fused)[1] == 0  # nothing left to fuse
    onnx.checker.check_model(fused, full_check=True)
    paths = [str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")]
    onnx.save(m, paths[0])
    onnx.save(fused, paths[1])
    dec = json.loads({p.key: p.value for p in m.metadata_props}["shiftc.decoder"])
    ids = np.array([[5, 900, 17, 4000, 3]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(5, dtype=np.int64)[None]}
    for i in range(dec["num_layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, dec["num_kv_heads"], 0, dec["head_dim"]), np.float32)
    a, b = ort_run(paths[0], feeds)["logits"], ort_run(paths[1], feeds)["logits"]
    np.testing.assert_allclose(b, a, rtol=RTOL_OP, atol=ATOL_OP)
