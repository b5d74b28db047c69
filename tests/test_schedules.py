"""Numerics of shiftc's CPU schedules (shiftc/backend/schedules): small ONNX graphs with symbolic
axes compiled through the real pipeline (compile_model) and compared with ONNX Runtime.

Each graph is checked at several values of its symbolic axes (M=1 is the decode case, odd sizes
exercise the padded tails) and the library must come from the optimizing pipeline — a schedule
that breaks compilation would otherwise be hidden by the unfused fallback — with no function left
to TVM's default (unscheduled) lowering. Static-shape variants (a [1, K] GEMV, batch-prefixed
[1, 1, K], small M) go through the same kernels. No timing asserts.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shiftc.backend.compile import compile_model
from shiftc.backend.runtime import load

# Tolerances (fp32). Matmuls reorder the K-sum (register tiles, packed panels): the error grows
# like sqrt(K) * eps * |x||w|; inputs here are N(0,1) and weights N(0, 1/K), so outputs are O(1).
RTOL = 1e-4
ATOL_MATMUL = 2e-5  # per sqrt(K)
ATOL_REDUCTION = 1e-5  # softmax probabilities / normalised rows, O(1) values
ATOL_ELEMENTWISE = 1e-6

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _compile(tmp_path, model, name="m"):
    onnx_path = tmp_path / f"{name}.onnx"
    so_path = tmp_path / f"{name}.so"
    onnx.save(model, onnx_path)
    res = compile_model(str(onnx_path), str(so_path))
    assert res.metadata.get("pipeline", "optimized") == "optimized", "schedules broke the optimizing pipeline"
    _assert_all_scheduled(res)
    return load(str(so_path), threads=2), load(str(onnx_path), threads=1)


def _assert_all_scheduled(res):
    """No fused PrimFunc kept TVM's default lowering (CompileResult and library metadata agree)."""
    unscheduled = res.to_json()["unscheduled_functions"]
    assert unscheduled == {"count": 0, "names": []}, f"functions no schedule rule matched: {unscheduled}"
    assert res.metadata["unscheduled_functions"] == 0


def _check(compiled, reference, feeds, atol, rtol=RTOL):
    got = compiled.run(feeds)
    want = reference.run(feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)


def _matmul_model(K, N, bias=False, epilogue=None, x_shape=None):
    """x @ W (+ b) (+ epilogue); x is [batch, seq, K] unless ``x_shape`` (ending in K) is given."""
    x_shape = list(x_shape) if x_shape is not None else ["batch", "seq", K]
    y_shape = x_shape[:-1] + [N]
    w = (RNG.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"])]
    out = "mm"
    if bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(N).astype(np.float32), "b"))
        nodes.append(helper.make_node("Add", ["mm", "b"], ["mmb"]))
        out = "mmb"
    if epilogue == "silu_gate":  # SwiGLU-style: silu(x W) * r
        nodes += [
            helper.make_node("Sigmoid", [out], ["sg"]),
            helper.make_node("Mul", [out, "sg"], ["silu"]),
            helper.make_node("Mul", ["silu", "r"], ["y"]),
        ]
    elif epilogue == "residual":
        nodes.append(helper.make_node("Add", [out, "r"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [out], ["y"]))
    inputs = [_vi("x", x_shape)]
    if epilogue in ("silu_gate", "residual"):
        inputs.append(_vi("r", y_shape))
    return _model(nodes, inputs, [_vi("y", y_shape)], inits)


MATMUL_CASES = [
    # (K, N, bias, epilogue)
    (64, 128, False, None),
    (100, 37, False, None),  # odd K and N (N padded)
    (96, 48, True, None),  # N a multiple of the vector width but not of the tile
    (64, 192, False, "silu_gate"),
    (128, 64, True, "residual"),
    (33, 7, False, None),  # N smaller than one vector
]


@pytest.mark.parametrize("K,N,bias,epilogue", MATMUL_CASES)
def test_matmul_symbolic_m(tmp_path, K, N, bias, epilogue):
    compiled, reference = _compile(tmp_path, _matmul_model(K, N, bias, epilogue))
    atol = ATOL_MATMUL * np.sqrt(K)
    for batch, seq in [(1, 1), (1, 5), (2, 3), (1, 17), (1, 128)]:
        feeds = {"x": RNG.standard_normal((batch, seq, K)).astype(np.float32)}
        if epilogue in ("silu_gate", "residual"):
            feeds["r"] = RNG.standard_normal((batch, seq, N)).astype(np.float32)
        _check(compiled, reference, feeds, atol)


def test_matmul_weights_packed(tmp_path):
    """A constant [K, N] weight is repacked at compile time; a shared weight feeds two MatMuls."""
    K, N = 80, 256
    w = (RNG.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    model = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["a"]),
            helper.make_node("MatMul", ["x2", "W"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        [_vi("x", ["M", K]), _vi("x2", ["M", K])],
        [_vi("y", ["M", N])],
        [numpy_helper.from_array(w, "W")],
    )
    compiled, reference = _compile(tmp_path, model)
    for m in (1, 4, 9):
        feeds = {
            "x": RNG.standard_normal((m, K)).astype(np.float32),
            "x2": RNG.standard_normal((m, K)).astype(np.float32),
        }
        _check(compiled, reference, feeds, ATOL_MATMUL * np.sqrt(K))


def test_matmul_two_dynamic_operands(tmp_path):
    """No constant: both operands are graph inputs (B is not packed)."""
    K, N = 72, 40
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [_vi("x", ["M", K]), _vi("w", [K, N])],
        [_vi("y", ["M", N])],
    )
    compiled, reference = _compile(tmp_path, model)
    for m in (1, 6):
        feeds = {
            "x": RNG.standard_normal((m, K)).astype(np.float32),
            "w": (RNG.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32),
        }
        _check(compiled, reference, feeds, ATOL_MATMUL * np.sqrt(K))


def _attention_model(kvh=3, g=3, d=64):
    """scores = q k^T * scale + mask; softmax; @ v — GQA layout [B, KVH, G, S, D] x [B, KVH, 1, D, T]."""
    scale = numpy_helper.from_array(np.array([1.0 / np.sqrt(d)], np.float32), "scale")
    nodes = [
        helper.make_node("MatMul", ["q", "kT"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Add", ["ss", "mask"], ["sm"]),
        helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    inputs = [
        _vi("q", ["B", kvh, g, "S", d]),
        _vi("kT", ["B", kvh, 1, d, "T"]),
        _vi("mask", ["B", 1, 1, "S", "T"]),
        _vi("v", ["B", kvh, 1, "T", d]),
    ]
    return _model(nodes, inputs, [_vi("y", ["B", kvh, g, "S", d])], [scale])


@pytest.mark.parametrize("S,T", [(1, 1), (1, 37), (7, 7), (16, 40), (128, 128)])
def test_attention_like_batched_matmul(tmp_path, S, T):
    compiled, reference = _compile(tmp_path, _attention_model(), f"att{S}_{T}")
    kvh, g, d = 3, 3, 64
    mask = np.where(np.tril(np.ones((S, T)), k=T - S) > 0, 0.0, -1e4).astype(np.float32)
    feeds = {
        "q": RNG.standard_normal((1, kvh, g, S, d)).astype(np.float32),
        "kT": RNG.standard_normal((1, kvh, 1, d, T)).astype(np.float32),
        "mask": mask.reshape(1, 1, 1, S, T),
        "v": RNG.standard_normal((1, kvh, 1, T, d)).astype(np.float32),
    }
    _check(compiled, reference, feeds, ATOL_MATMUL * np.sqrt(max(d, T)))


@pytest.mark.parametrize("T", [1, 5, 64, 129])
def test_softmax(tmp_path, T):
    model = _model(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
        [_vi("x", ["B", 4, "S", "T"])],
        [_vi("y", ["B", 4, "S", "T"])],
    )
    compiled, reference = _compile(tmp_path, model, f"sm{T}")
    for s in (1, 3):
        feeds = {"x": (3 * RNG.standard_normal((1, 4, s, T))).astype(np.float32)}
        _check(compiled, reference, feeds, ATOL_REDUCTION)


@pytest.mark.parametrize("H", [64, 100, 576])
def test_rmsnorm_like_reduction(tmp_path, H):
    """x / sqrt(mean(x^2) + eps) * w, as the decoder exporter writes it."""
    w = RNG.standard_normal(H).astype(np.float32)
    model = _model(
        [
            helper.make_node("Mul", ["x", "x"], ["sq"]),
            helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
            helper.make_node("Add", ["ms", "eps"], ["mse"]),
            helper.make_node("Sqrt", ["mse"], ["rms"]),
            helper.make_node("Div", ["x", "rms"], ["xn"]),
            helper.make_node("Mul", ["xn", "w"], ["y"]),
        ],
        [_vi("x", ["batch", "seq", H])],
        [_vi("y", ["batch", "seq", H])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([-1], np.int64), "axes"),
            numpy_helper.from_array(np.array([1e-5], np.float32), "eps"),
        ],
    )
    compiled, reference = _compile(tmp_path, model, f"rms{H}")
    for seq in (1, 7, 128):
        feeds = {"x": RNG.standard_normal((1, seq, H)).astype(np.float32)}
        _check(compiled, reference, feeds, ATOL_REDUCTION * 10)


def test_elementwise_and_gather(tmp_path):
    table = RNG.standard_normal((50, 24)).astype(np.float32)
    model = _model(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"]),
            helper.make_node("Sigmoid", ["e"], ["s"]),
            helper.make_node("Mul", ["e", "s"], ["y0"]),
            helper.make_node("Transpose", ["y0"], ["y"], perm=[1, 0, 2]),
        ],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
        [_vi("y", ["S", "B", 24])],
        [numpy_helper.from_array(table, "table")],
    )
    compiled, reference = _compile(tmp_path, model)
    for b, s in ((1, 1), (2, 9)):
        feeds = {"ids": RNG.integers(0, 50, (b, s)).astype(np.int64)}
        _check(compiled, reference, feeds, ATOL_ELEMENTWISE)


def test_rules_schedule_matmul_and_reductions():
    """The rules claim the functions they are written for (guards against a silent fallback)."""
    import tvm
    from tvm import relax  # noqa: F401
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    from shiftc.backend.importer import to_relax
    from shiftc.backend.schedules import cpu_rules
    from shiftc.targets import get_target

    spec = get_target("host")
    target = spec.tvm_target()
    mod = to_relax(_attention_model(), "attention")
    with target, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(
            cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
        )(mod)
    matmul, reduction = cpu_rules(spec.isa)[:2]
    claimed = {}
    from tvm import tirx

    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            claimed[gv.name_hint] = (
                "matmul" if matmul.apply(func, target, False) is not None
                else "reduction" if reduction.apply(func, target, False) is not None
                else None
            )
    assert sum(v == "matmul" for v in claimed.values()) == 2, json.dumps(claimed)
    assert any(v == "reduction" for k, v in claimed.items() if "softmax" in k), json.dumps(claimed)


def test_matmul_symbolic_m_has_gemv_branch():
    """With a symbolic m the rule emits both kernels: ``if m == 1`` (decode GEMV) else the MR-row tile."""
    import tvm
    from tvm import tirx
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    from shiftc.backend.importer import to_relax
    from shiftc.backend.schedules import cpu_rules
    from shiftc.targets import get_target

    spec = get_target("host")
    target = spec.tvm_target()
    mod = to_relax(_matmul_model(64, 128), "matmul")
    with target, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(
            cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
        )(mod)
    matmul = cpu_rules(spec.isa)[0]
    funcs = [f for _gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    scheduled = [matmul.apply(f, target, False) for f in funcs]
    scripts = [s.mod["main"].script() for s in scheduled if s is not None]
    assert len(scripts) == 1
    assert "== T.int64(1):" in scripts[0] and "else:" in scripts[0], scripts[0][:2000]


def test_softmax_last_axis_uses_row_kernel():
    """A float32 softmax over the last axis becomes the hand-written row softmax (whole vectors +
    scalar tail for a symbolic row length); other axes keep topi's fast_softmax."""
    import tvm
    from tvm import relax

    from shiftc.backend.importer import to_relax
    from shiftc.backend.schedules.fast_math import fast_math_pass

    def rewritten(axis):
        model = _model(
            [helper.make_node("Softmax", ["x"], ["y"], axis=axis)],
            [_vi("x", ["B", 4, "S", "T"])],
            [_vi("y", ["B", 4, "S", "T"])],
        )
        mod = fast_math_pass(16)(to_relax(model, "softmax"))
        return {gv.name_hint for gv, f in mod.functions_items() if not isinstance(f, relax.Function)}

    assert "shiftc_softmax_rows" in rewritten(-1)
    names = rewritten(1)
    assert "shiftc_softmax_rows" not in names and any("softmax" in n for n in names), names
    assert tvm is not None


@pytest.mark.parametrize("T", [3, 37])
def test_softmax_inner_axis(tmp_path, T):
    model = _model(
        [helper.make_node("Softmax", ["x"], ["y"], axis=1)],
        [_vi("x", ["B", "C", T])],
        [_vi("y", ["B", "C", T])],
    )
    compiled, reference = _compile(tmp_path, model, f"smi{T}")
    for c in (1, 19):
        feeds = {"x": (3 * RNG.standard_normal((2, c, T))).astype(np.float32)}
        _check(compiled, reference, feeds, ATOL_REDUCTION)


STATIC_MATMUL_CASES = [
    # (x shape, N, bias, epilogue): static shapes, no symbolic axis
    ([1, 64], 128, False, None),  # GEMV [1, K] x [K, N]: the decode kernel, not the fallback
    ([1, 1, 96], 48, True, None),  # batch-prefixed single row
    ([1, 100], 37, False, None),  # odd K, N padded to the tile
    ([1, 1, 64], 192, False, "silu_gate"),
    ([3, 128], 64, True, "residual"),  # small static M: one unpadded 3-row tile
    ([2, 1, 72], 40, False, None),  # a batch of 2 single rows (the batch is M)
    ([8, 64], 128, False, None),  # M = 8: two 4-row tiles
    ([1, 5, 33], 7, False, None),  # N smaller than one vector
]


@pytest.mark.parametrize("x_shape,N,bias,epilogue", STATIC_MATMUL_CASES)
def test_matmul_static_shapes(tmp_path, x_shape, N, bias, epilogue):
    K = x_shape[-1]
    compiled, reference = _compile(tmp_path, _matmul_model(K, N, bias, epilogue, x_shape=x_shape))
    feeds = {"x": RNG.standard_normal(x_shape).astype(np.float32)}
    if epilogue in ("silu_gate", "residual"):
        feeds["r"] = RNG.standard_normal(x_shape[:-1] + [N]).astype(np.float32)
    _check(compiled, reference, feeds, ATOL_MATMUL * np.sqrt(K))


@pytest.mark.parametrize("x_shape", [[1, 64], [1, 1, 64], [3, 64], [2, 1, 64]])
def test_matmul_rule_claims_static_small_m(x_shape):
    """Static unit axes vanish from the normalised block (C[0, n]); the rule still claims it."""
    import tvm
    from tvm import tirx
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    from shiftc.backend.importer import to_relax
    from shiftc.backend.schedules import cpu_rules
    from shiftc.targets import get_target

    spec = get_target("host")
    target = spec.tvm_target()
    mod = to_relax(_matmul_model(64, 128, x_shape=x_shape), "matmul")
    with target, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(cpu_generic.legalize_passes(target))(mod)
    matmul = cpu_rules(spec.isa)[0]
    funcs = [f for _gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(funcs) == 1 and matmul.apply(funcs[0], target, False) is not None
    assert matmul.packable(funcs[0]) is not None  # the constant weight is packed as for symbolic M


@pytest.mark.parametrize("S,T", [(1, 37), (7, 7)])
def test_attention_static_shapes(tmp_path, S, T):
    kvh, g, d = 3, 3, 64
    scale = numpy_helper.from_array(np.array([1.0 / np.sqrt(d)], np.float32), "scale")
    model = _model(
        [
            helper.make_node("MatMul", ["q", "kT"], ["s"]),
            helper.make_node("Mul", ["s", "scale"], ["ss"]),
            helper.make_node("Add", ["ss", "mask"], ["sm"]),
            helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", "v"], ["y"]),
        ],
        [_vi("q", [1, kvh, g, S, d]), _vi("kT", [1, kvh, 1, d, T]), _vi("mask", [1, 1, 1, S, T]), _vi("v", [1, kvh, 1, T, d])],
        [_vi("y", [1, kvh, g, S, d])],
        [scale],
    )
    compiled, reference = _compile(tmp_path, model, f"att_static{S}_{T}")
    feeds = {
        "q": RNG.standard_normal((1, kvh, g, S, d)).astype(np.float32),
        "kT": RNG.standard_normal((1, kvh, 1, d, T)).astype(np.float32),
        "mask": np.zeros((1, 1, 1, S, T), np.float32),
        "v": RNG.standard_normal((1, kvh, 1, T, d)).astype(np.float32),
    }
    _check(compiled, reference, feeds, ATOL_MATMUL * np.sqrt(max(d, T)))


def test_max_pool_scheduled(tmp_path):
    """A lone reduction with a spatial output (a 2x2 max-pool window): SpatialReduction."""
    model = _model(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
        [_vi("x", ["B", 16, 16, 16])],
        [_vi("y", ["B", 16, 8, 8])],
    )
    compiled, reference = _compile(tmp_path, model, "pool")
    for b in (1, 3):
        _check(compiled, reference, {"x": RNG.standard_normal((b, 16, 16, 16)).astype(np.float32)}, ATOL_ELEMENTWISE)


def test_split_outputs_scheduled(tmp_path):
    """A function with several outputs (Split of a graph input): one parallel nest per output."""
    model = _model(
        [helper.make_node("Split", ["x"], ["a", "b"], axis=-1, num_outputs=2)],
        [_vi("x", ["B", "S", 64])],
        [_vi("a", ["B", "S", 32]), _vi("b", ["B", "S", 32])],
    )
    compiled, reference = _compile(tmp_path, model, "split")
    _check(compiled, reference, {"x": RNG.standard_normal((2, 3, 64)).astype(np.float32)}, 0.0)


# -- no function left to TVM's default lowering on the test models --------------------------

@pytest.mark.parametrize("factory", ["mlp", "small_cnn"])
def test_factory_models_fully_scheduled(tmp_path, factory):
    import shiftc

    onnx_path, so_path = str(tmp_path / "m.onnx"), str(tmp_path / "m.so")
    shiftc.export(f"tests.factories:{factory}", onnx_path)
    res = compile_model(onnx_path, so_path)
    assert res.metadata["pipeline"] == "optimized"
    _assert_all_scheduled(res)


def test_decoder_fully_scheduled(tiny_llama):
    """The decoder of frontend/decoder_onnx.py (KV cache, cumsum mask, GQA): every function
    scheduled, read back from the library's metadata."""
    meta = load(tiny_llama[1]).meta
    assert meta["pipeline"] == "optimized"
    assert meta["unscheduled_functions"] == 0


def test_encoder_fully_scheduled(tmp_path):
    """The BERT-style encoder of test_backend_correctness: its data-dependent Range shapes defeat
    TVM's FuseOps, so it compiles without fusion — still every function scheduled."""
    import shiftc
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    onnx_path, so_path = str(tmp_path / "bert.onnx"), str(tmp_path / "bert.so")
    shiftc.export(str(tmp_path / "bert"), onnx_path)
    res = compile_model(onnx_path, so_path)
    assert res.metadata["pipeline"] in ("optimized", "unfused")
    _assert_all_scheduled(res)


def test_unmatched_function_is_counted(tmp_path, monkeypatch):
    """With the reduction rules taken away, the RMSNorm function falls back to TVM's default
    lowering: it is named in the result and counted in the metadata (and still correct)."""
    from shiftc.backend import schedules

    all_rules = schedules.cpu_rules
    monkeypatch.setattr(
        schedules, "cpu_rules",
        lambda isa: [r for r in all_rules(isa) if isinstance(r, (schedules.Matmul, schedules.Injective))],
    )
    H = 64
    model = _model(
        [
            helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
            helper.make_node("Sub", ["x", "m"], ["y"]),
        ],
        [_vi("x", ["batch", H])],
        [_vi("y", ["batch", H])],
        [numpy_helper.from_array(np.array([-1], np.int64), "axes")],
    )
    onnx_path, so_path = tmp_path / "u.onnx", tmp_path / "u.so"
    onnx.save(model, onnx_path)
    res = compile_model(str(onnx_path), str(so_path))
    unscheduled = res.to_json()["unscheduled_functions"]
    assert unscheduled["count"] >= 1 and any("mean" in n for n in unscheduled["names"]), unscheduled
    assert res.metadata["unscheduled_functions"] == unscheduled["count"]
    assert load(str(so_path)).meta["unscheduled_functions"] == unscheduled["count"]
    _check(load(str(so_path)), load(str(onnx_path)), {"x": RNG.standard_normal((3, H)).astype(np.float32)},
           ATOL_REDUCTION)


def test_unscheduled_functions_counts_only_unclaimed():
    """A PrimFunc counts unless a rule scheduled it or it calls shiftc's C kernels."""
    import tvm
    from tvm import te

    from shiftc.backend.schedules import unscheduled_functions
    from shiftc.backend.shiftc_ops import EXTERN_ATTR

    a = te.placeholder((4, 8), "float32", name="a")
    b = te.compute((4, 8), lambda i, j: a[i, j] * 2.0, name="b")
    plain = te.create_prim_func([a, b])
    mod = tvm.IRModule({
        "plain": plain,
        "scheduled": plain.with_attr("tirx.is_scheduled", True),
        "extern": plain.with_attr(EXTERN_ATTR, True),
    })
    assert unscheduled_functions(mod) == ["plain"]
