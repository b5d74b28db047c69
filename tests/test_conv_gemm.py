"""Dense convolutions rewritten as im2col + MatMul for CPU targets (shiftc/backend/conv_gemm.py):
the rewritten graph computes what the convolution does (ONNX Runtime on both), and a compiled CNN
with its convolutions rewritten matches ONNX Runtime on the original graph."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import shiftc
from conftest import assert_close
from shiftc.backend import conv_gemm

# float32 sums of up to 5*5*8 products in another order
TOL_CONV = (1e-5, 1e-5)


def _conv_model(cin=8, cout=12, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), group=1, bias=True, hw=(13, 11),
                batch="batch"):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((cout, cin // group, *k)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b")
    node = helper.make_node("Conv", ["x", "w", "b"] if bias else ["x", "w"], ["y"], strides=list(strides),
                            pads=list(pads), group=group, kernel_shape=list(k))
    g = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, *hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b] if bias else [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("kw", [
    {}, {"strides": (2, 2)}, {"pads": (0, 1, 2, 0)}, {"k": (1, 1), "pads": (0, 0, 0, 0)},
    {"k": (1, 1), "strides": (2, 2), "pads": (0, 0, 0, 0)}, {"k": (5, 3), "pads": (2, 1, 2, 1), "bias": False},
    {"cin": 1, "k": (3, 3)}, {"batch": 2},
])
def test_rewrite_computes_the_convolution(kw):
    model = _conv_model(**kw)
    rewritten, n = conv_gemm.rewrite(model)
    assert n == 1 and not any(node.op_type == "Conv" for node in rewritten.graph.node)
    x = np.random.default_rng(1).standard_normal((2, kw.get("cin", 8), 13, 11)).astype(np.float32)
    assert_close(_run(rewritten, x), _run(model, x), rtol=TOL_CONV[0], atol=TOL_CONV[1], what=str(kw))


@pytest.mark.parametrize("kw", [{"group": 2}, {"group": 8, "cout": 8}, {"hw": ("h", "w")}])
def test_grouped_or_unsized_convolutions_stay(kw):
    model = _conv_model(**kw)
    assert conv_gemm.rewrite(model) == (model, 0)


def test_compiled_cnn_uses_the_rewrite(tmp_path):
    onnx_path, lib = str(tmp_path / "cnn.onnx"), str(tmp_path / "cnn.so")
    shiftc.export("tests.factories:small_cnn", onnx_path)
    shiftc.compile(onnx_path, lib)
    m = shiftc.load(lib)
    assert m.meta["conv_gemm"] >= 1
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    name = m.inputs[0]["name"]
    got, ref = m.run({name: x}), shiftc.load(onnx_path).run({name: x})
    for k in ref:
        assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, what=k)
