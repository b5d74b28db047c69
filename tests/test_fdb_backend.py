"""ai.shiftc::FdbMatMul ({0,1} planes, float16 scales of any sign, per-group float16 offsets): the
compiled library (lut16 kernels with coding "01", μ folded into the offsets), ONNX Runtime on the
op's function body, and the numpy reference agree. Also the lut16 kernels called directly.

Tolerance: per output |y - ref| <= RTOL * S, S = sum_k |x_k| (sum_i |α_i| + |μ|) (the kernels sum
±α/2 and offset terms, each bounded by that sum; float32 accumulation).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shiftc.passes import bcq, ops

RTOL = 4e-6

# (name, bits, group, N, K)
CASES = [("fdb_g128", 2, 128, 40, 576),   # partial last group, N not a multiple of 16
         ("fdb_g32", 2, 32, 17, 64),
         ("b1_g64", 1, 64, 33, 200)]


def _random_layer(rng, bits, group, n, k):
    ng = -(-k // group)
    planes = bcq.pack_planes(rng.integers(0, 2, size=(bits, n, k), dtype=np.uint8))
    scales = (rng.standard_normal((bits, n, ng)) * 0.05).astype(np.float16)  # signed on purpose
    offsets = (rng.standard_normal((n, ng)) * 0.02).astype(np.float16)
    return planes, scales, offsets


def _bound(x, scales, offsets, group, k):
    a = np.abs(scales.astype(np.float64)).sum(0) + np.abs(offsets.astype(np.float64))
    return np.abs(x.astype(np.float64)).reshape(-1, k) @ np.repeat(a, group, axis=-1)[:, :k].T


def _model(layers, with_functions):
    nodes, inits, outs = [], [], []
    ks = sorted({c[4] for c in CASES})
    ins = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["batch", "seq", k]) for k in ks]
    for name, bits, group, n, k in CASES:
        p, s, o = layers[name]
        inits += [numpy_helper.from_array(p, f"{name}.planes"), numpy_helper.from_array(s, f"{name}.scales"),
                  numpy_helper.from_array(o, f"{name}.offsets")]
        nodes.append(helper.make_node("FdbMatMul", [f"x{k}", f"{name}.planes", f"{name}.scales", f"{name}.offsets"],
                                      [name], name=name, domain=ops.DOMAIN, bits=bits, group_size=group, in_features=k))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", n]))
    m = helper.make_model(helper.make_graph(nodes, "fdb_cases", ins, outs, inits),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)])
    if with_functions:
        ops.add_functions(m, ["FdbMatMul"])
    return m


@pytest.fixture(scope="module")
def fdb_case(tmp_path_factory):
    import shiftc

    rng = np.random.default_rng(0)
    layers = {c[0]: _random_layer(rng, *c[1:]) for c in CASES}
    d = tmp_path_factory.mktemp("fdb_backend")
    path, lib = str(d / "fdb.onnx"), str(d / "fdb.so")
    m = _model(layers, True)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)
    shiftc.compile(path, lib)
    return layers, path, lib


@pytest.mark.parametrize("rows", [1, 5])  # both sides of the kernels' GEMV/GEMM switch
def test_compiled_and_function_body_match_reference(fdb_case, rows):
    import onnxruntime as ort

    import shiftc

    layers, path, lib = fdb_case
    rng = np.random.default_rng(rows)
    feeds = {f"x{k}": rng.standard_normal((1, rows, k)).astype(np.float32) for k in {c[4] for c in CASES}}
    got = shiftc.load(lib).run(feeds)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ort_out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for name, bits, group, n, k in CASES:
        p, s, o = layers[name]
        x = feeds[f"x{k}"]
        ref = ops.fdb_matmul_ref(x, p, s, o, bits=bits, group_size=group, in_features=k).reshape(rows, n)
        bound = _bound(x, s, o, group, k)
        for what, y in (("compiled", got[name]), ("onnxruntime", ort_out[name])):
            assert y.shape == (1, rows, n), what
            err = np.abs(y.reshape(rows, n).astype(np.float64) - ref)
            assert np.all(err <= RTOL * bound + 1e-30), f"{what} {name} rows={rows}: {np.max(err / bound):.3g}"


def test_lut16_kernels_direct():
    """shiftc._native with the arrays the lowering builds (what benchmarks/bench_fdb.py times)."""
    from shiftc import _native as nat
    from shiftc.backend.shiftc_ops import fdb_lut16

    rng = np.random.default_rng(4)
    for bits, group, n, k in [(2, 128, 40, 576), (1, 32, 16, 96)]:
        p, s, o = _random_layer(rng, bits, group, n, k)
        codes, sc, off = fdb_lut16(p, s, o, k, group)
        for m in (1, 7):
            x = rng.standard_normal((m, k)).astype(np.float32)
            y = nat.bcq_matmul_lut16(x, codes, sc, off, n, k, bits, group, threads=1)
            ref = ops.fdb_matmul_ref(x, p, s, o, bits=bits, group_size=group, in_features=k)
            assert np.all(np.abs(y - ref) <= RTOL * _bound(x, s, o, group, k) + 1e-30)


def test_op_table_entry():
    spec = ops.OPS["FdbMatMul"]
    assert [i[0] for i in spec.inputs] == ["X", "planes", "scales", "offsets"]
    assert spec.function(17).name == "FdbMatMul" and spec.reference is ops.fdb_matmul_ref
    with pytest.raises(ValueError, match="opset"):
        spec.function(11)
