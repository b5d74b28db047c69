"""BcqMatMul in compiled libraries: the lut16 repacking and the C kernels called from TVM code.

The reference is shiftc.passes.ops.bcq_matmul_ref (numpy, float64). One model holds several
BcqMatMul nodes (bit widths, group sizes, padded shapes, both codings) so it compiles once; it is
run at row counts on both sides of the kernels' GEMV/GEMM switch.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shiftc.backend.shiftc_ops import pack_lut16
from shiftc.passes import bcq, ops

# |compiled - reference| <= RTOL * sum_k |x_k| |w_nk| per output: float32 accumulation of K terms
RTOL = 2e-6

# (name, bits, group, N, K, coding)
CASES = [
    ("q3g128", 3, 128, 40, 576, "pm1"),   # partial last group (576 = 4.5 x 128), N not a multiple of 16
    ("q2g64", 2, 64, 96, 576, "pm1"),
    ("q4g32", 4, 32, 17, 64, "pm1"),
    ("q1g128", 1, 128, 33, 200, "pm1"),
    ("q2g32_01", 2, 32, 48, 576, "01"),   # {0,1} planes: halved scales + per-group offsets
]


def _random_layer(rng, bits, group, n, k):
    planes = bcq.pack_planes(rng.integers(0, 2, size=(bits, n, k), dtype=np.uint8))
    exps = rng.integers(-9, -3, size=(bits, n, -(-k // group), 1)).astype(np.int8)
    exps[0, 0, 0, 0] = bcq.NO_TERM  # a zero scale
    return planes, exps


@pytest.fixture(scope="module")
def bcq_model(tmp_path_factory):
    import shiftc

    rng = np.random.default_rng(0)
    k_all = {c[4] for c in CASES}
    nodes, inits, outputs, inputs, layers = [], [], [], [], {}
    for k in sorted(k_all):
        inputs.append(helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["batch", "seq", k]))
    for name, bits, group, n, k, coding in CASES:
        planes, exps = _random_layer(rng, bits, group, n, k)
        layers[name] = (planes, exps)
        inits += [numpy_helper.from_array(planes, f"{name}.planes"), numpy_helper.from_array(exps, f"{name}.exps")]
        nodes.append(helper.make_node("BcqMatMul", [f"x{k}", f"{name}.planes", f"{name}.exps"], [name], name=name,
                                      domain=ops.DOMAIN, bits=bits, group_size=group, in_features=k, coding=coding))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", n]))
    graph = helper.make_graph(nodes, "bcq_cases", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)])
    d = tmp_path_factory.mktemp("bcq_backend")
    path, lib = str(d / "bcq.onnx"), str(d / "bcq.so")
    onnx.save(model, path)
    shiftc.compile(path, lib)
    return layers, lib


def _reference(x, planes, exps, bits, group, k, coding):
    w = bcq.reconstruct(bcq.unpack_planes(planes, k), bcq.exps_to_alpha(exps), group, coding).astype(np.float64)
    x64 = x.astype(np.float64)
    return x64 @ w.T, np.abs(x64) @ np.abs(w).T


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 130])
def test_compiled_bcq_matches_reference(bcq_model, rows):
    import shiftc

    layers, lib = bcq_model
    model = shiftc.load(lib)
    rng = np.random.default_rng(rows)
    feeds = {f"x{k}": rng.standard_normal((1, rows, k)).astype(np.float32) for k in {c[4] for c in CASES}}
    got = model.run(feeds)
    for name, bits, group, n, k, coding in CASES:
        ref, scale = _reference(feeds[f"x{k}"], *layers[name], bits, group, k, coding)
        err = np.abs(got[name].astype(np.float64) - ref)
        assert got[name].shape == (1, rows, n)
        assert np.all(err <= RTOL * scale + 1e-30), f"{name} rows={rows}: worst {np.max(err / (scale + 1e-30)):.3g} x RTOL scale"


def test_bcq_function_body_agrees_with_compiled(bcq_model, tmp_path):
    """The pm1 cases also run in ONNX Runtime through the op's function body (the user's reference)."""
    import onnxruntime as ort

    import shiftc

    layers, lib = bcq_model
    pm1 = [c for c in CASES if c[5] == "pm1" and c[4] == 576]
    nodes, inits = [], []
    for name, bits, group, n, k, _ in pm1:
        planes, exps = layers[name]
        inits += [numpy_helper.from_array(planes, f"{name}.planes"), numpy_helper.from_array(exps, f"{name}.exps")]
        nodes.append(helper.make_node("BcqMatMul", ["x576", f"{name}.planes", f"{name}.exps"], [name], domain=ops.DOMAIN,
                                      bits=bits, group_size=group, in_features=k, coding="pm1"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x576", TensorProto.FLOAT, [1, 3, 576])],
                              [helper.make_tensor_value_info(c[0], TensorProto.FLOAT, None) for c in pm1], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)])
    ops.add_functions(m, ["BcqMatMul"])
    x = np.random.default_rng(3).standard_normal((1, 3, 576)).astype(np.float32)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x576": x})))
    compiled = shiftc.load(lib).run({"x576": x, "x64": np.zeros((1, 3, 64), np.float32),
                                     "x200": np.zeros((1, 3, 200), np.float32)})
    for name, *_ in pm1:
        np.testing.assert_allclose(compiled[name], ort_out[name], rtol=1e-4, atol=1e-5)


def test_library_holds_packed_weights_not_floats(bcq_model):
    """The compiled library stores the planes (q bits per weight), not a reconstructed fp32 matrix."""
    import os

    layers, lib = bcq_model
    fp32_bytes = sum(4 * n * k for _, _, _, n, k, _ in CASES)
    packed_bytes = sum(p.nbytes + e.nbytes for p, e in layers.values())
    size = os.path.getsize(lib)
    # the library is code + packed weights + float scales; fp32 weights alone would be ~4.6x larger
    assert size < 1_000_000 and packed_bytes < fp32_bytes / 4


def test_pack_lut16_layout():
    """Every bit and scale lands where bcq_lut.h says, checked element by element."""
    rng = np.random.default_rng(1)
    q, n, k, g = 3, 21, 96, 64
    bits01 = rng.integers(0, 2, size=(q, n, k), dtype=np.uint8)
    alpha = rng.random((q, n, 2)).astype(np.float32)
    codes, scales, offsets = pack_lut16(bcq.pack_planes(bits01), alpha, k, g, "pm1")
    kp, nb, ng = 128, 2, 2
    assert offsets is None and codes.shape == (nb * kp // 8 * q * 16,) and scales.shape == (nb * ng * q * 16,)
    codes = codes.reshape(nb, kp // 8, q, 16)
    scales = scales.reshape(nb, ng, q, 16)
    for i in range(q):
        for r in range(nb * 16):
            for c in range(kp):
                bit = (codes[r // 16, c // 8, i, r % 16] >> (c % 8)) & 1
                assert bit == (bits01[i, r, c] if r < n and c < k else 0)
            for gi in range(ng):
                assert scales[r // 16, gi, i, r % 16] == (alpha[i, r, gi] if r < n else 0)
    _, half, off = pack_lut16(bcq.pack_planes(bits01), alpha, k, g, "01")
    np.testing.assert_array_equal(half.reshape(nb, ng, q, 16)[0, 1, 2, 5], alpha[2, 5, 1] / 2)
    np.testing.assert_allclose(off.reshape(nb, ng, 16)[1, 0, 3], alpha[:, 19, 0].sum() / 2, rtol=1e-6)


def test_native_packer_matches_numpy():
    from shiftc import _native

    from conftest import require

    require(hasattr(_native, "bcq_pack_lut16"), "shiftc._native has no bcq_pack_lut16 (rebuild: make setup)")
    rng = np.random.default_rng(2)
    for q, n, k, g, coding in [(3, 40, 576, 128, "pm1"), (2, 7, 64, 32, "01"), (4, 33, 200, 64, "pm1")]:
        planes = bcq.pack_planes(rng.integers(0, 2, size=(q, n, k), dtype=np.uint8))
        alpha = rng.random((q, n, -(-k // g))).astype(np.float32)
        want = pack_lut16(planes, alpha, k, g, coding)
        got = _native.bcq_pack_lut16(planes, alpha, k, g, coding)
        for a, b in zip(got, want):
            if b is None:
                assert a is None
            else:
                np.testing.assert_array_equal(np.asarray(a), b)
