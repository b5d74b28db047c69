"""Deviation-aware distillation of FdbMatMul scales/offsets (shiftc/passes/distill.py) on the tiny
decoder: the torch student equals the ONNX model before training, the loss falls, only scales
and offsets change, and the flags are checked."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from shiftc.passes import distill as D
from shiftc.passes.binarize import BinarizeConfig, BinarizePass

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_fdb(tiny_llama_dir, tmp_path_factory):
    import shiftc

    path = str(tmp_path_factory.mktemp("tiny_distill") / "tiny.onnx")
    shiftc.export(tiny_llama_dir, path)
    return BinarizePass(BinarizeConfig(group=32, iters=2))(onnx.load(path)).model


@pytest.fixture(scope="module")
def tiny_sa(tiny_llama_dir, tmp_path_factory):
    import shiftc
    from shiftc.passes.shiftadd import ShiftAddConfig, ShiftAddPass

    path = str(tmp_path_factory.mktemp("tiny_distill_sa") / "tiny.onnx")
    shiftc.export(tiny_llama_dir, path)
    return ShiftAddPass(ShiftAddConfig(bits=2, group=32, iters=2, workers=1))(onnx.load(path)).model


def _onnx_logits(model, tmp_path, x):
    import shiftc
    from shiftc.passes.ops import dequantized_copy

    path = str(tmp_path / "deq.onnx")
    onnx.save(dequantized_copy(model), path)
    return shiftc.load(path).lm_session().step(x)


def test_student_matches_onnx_and_loss_falls(tiny_fdb, tmp_path):
    import shiftc
    from shiftc.passes.binarize import dequantized_copy

    teacher = D.load_teacher(tiny_fdb, None)
    student, modules = D.build_student(teacher, tiny_fdb)
    assert len(modules) == 15 and "lm_head" in modules  # 7 per block + the (untied) head
    path = str(tmp_path / "deq.onnx")
    onnx.save(dequantized_copy(tiny_fdb), path)
    x = np.array([[5, 9, 100, 3000, 17]])
    want = shiftc.load(path).lm_session().step(x)
    with torch.no_grad():
        got = student(input_ids=torch.as_tensor(x)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    ids = np.random.default_rng(0).integers(0, 49152, size=(4, 24))
    out, rep = D.distill(tiny_fdb, teacher, ids, D.DistillConfig(steps=12, lr=3e-3, loss="dad", seed=0))
    h = rep["history"]
    assert rep["steps"] == 12 and np.mean([e["kl"] for e in h[-4:]]) < np.mean([e["kl"] for e in h[:4]])
    before = {t.name: numpy_helper.to_array(t) for t in tiny_fdb.graph.initializer}
    changed = {t.name for t in out.graph.initializer if not np.array_equal(numpy_helper.to_array(t), before[t.name])}
    assert changed and all(n.endswith((".fdb_scales", ".fdb_offsets")) for n in changed)
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in out.graph.initializer if t.name in changed)


def test_shiftadd_student_trains_power_of_two_scales(tiny_sa, tmp_path):
    """BcqMatMul layers: the student equals the ONNX model, training lowers the KL, only the
    exponents change, and the written-back model is exactly the student (scales rounded to powers of
    two in the forward, straight-through to the latent float scales)."""
    from shiftc.passes import ops

    teacher = D.load_teacher(tiny_sa, None)
    student, modules = D.build_student(teacher, tiny_sa)
    assert len(modules) == 15 and all(m.coding == "pm1" and m.scale_mode == "pow2x2" for m in modules.values())
    x = np.array([[5, 9, 100, 3000, 17]])
    with torch.no_grad():
        got = student(input_ids=torch.as_tensor(x)).logits.numpy()
    want = _onnx_logits(tiny_sa, tmp_path, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    ids = np.random.default_rng(0).integers(0, 49152, size=(4, 24))
    out, rep = D.distill(tiny_sa, teacher, ids, D.DistillConfig(steps=12, lr=3e-3, loss="kl", seed=0))
    h = rep["history"]
    assert np.mean([e["kl"] for e in h[-4:]]) < np.mean([e["kl"] for e in h[:4]])
    before = {t.name: numpy_helper.to_array(t) for t in tiny_sa.graph.initializer}
    changed = {t.name for t in out.graph.initializer if not np.array_equal(numpy_helper.to_array(t), before[t.name])}
    assert changed and all(n.endswith(".bcq_exps") for n in changed)
    with torch.no_grad():  # latent scales off the grid: written back as the rounded ones the forward uses
        for m in modules.values():
            m.scales.mul_(torch.empty_like(m.scales).uniform_(0.8, 1.25))
    back = D.write_back(tiny_sa, modules)
    inits = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
    layers = D._plane_layers(back)
    for path, m in modules.items():
        node = layers[path]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs["coding"] = attrs["coding"].decode()
        w = ops.bcq_matmul_weight(inits[node.input[1]], inits[node.input[2]], **attrs)
        np.testing.assert_array_equal(w, m.weight_hat().detach().numpy())


def test_norm_gains_tuned_and_written_back(tiny_sa):
    """norms=True: the RMSNorm gains train too and land in their fp32 initializers (same names)."""
    teacher = D.load_teacher(tiny_sa, None)
    ids = np.random.default_rng(0).integers(0, 49152, size=(2, 16))
    out, rep = D.distill(tiny_sa, teacher, ids, D.DistillConfig(steps=3, lr=3e-3, loss="kl", norms=True))
    assert rep["norms"] == 5  # 2 per block + the final norm
    before = {t.name: numpy_helper.to_array(t) for t in tiny_sa.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    changed = {n for n in after if not np.array_equal(after[n], before[n])}
    norms = {n for n in changed if n.endswith("norm.weight")}
    assert len(norms) == 5 and changed - norms and all(n.endswith(".bcq_exps") for n in changed - norms)
    assert all(after[n].dtype == np.float32 and after[n].shape == before[n].shape for n in norms)


def test_dad_weights_favour_uncertain_teacher_confident_student():
    v = 50
    t = torch.zeros(2, v)  # token 0: teacher uniform (ambiguous); token 1: teacher peaked
    t[1, 0] = 10.0
    s = torch.zeros(2, v)
    s[0, 3] = 8.0  # the student is confident on the ambiguous token
    s[1, 0] = 10.0
    s[1, 1] = 2.0
    dad, kl = D.token_losses(t, s, "dad")
    plain, _ = D.token_losses(t, s, "kl")
    assert torch.isclose(plain, kl) and dad > plain  # the ambiguous token's KL is up-weighted


def test_flags(tiny_fdb, tmp_path):
    import shiftc
    from shiftc.errors import UsageError

    with pytest.raises(UsageError, match="--distill-loss"):
        D.distill(tiny_fdb, None, np.zeros((1, 4), np.int64), D.DistillConfig(loss="ce"))
    with pytest.raises(UsageError, match="--shiftadd-bits N or --binarize"):  # pruning only: nothing to distill
        shiftc.compress("unused.onnx", str(tmp_path / "x.onnx"), prune=0.2, distill_steps=3)
    with pytest.raises(UsageError, match="--distill-minutes"):
        shiftc.compress("unused.onnx", str(tmp_path / "x.onnx"), bits=3, distill_minutes=-1.0)
    with pytest.raises(UsageError, match="--distill-plane-lr"):
        shiftc.compress("unused.onnx", str(tmp_path / "x.onnx"), bits=3, distill_steps=1, distill_plane_lr=-1.0)
    with pytest.raises(UsageError, match="--distill-source"):
        D.load_teacher(tiny_fdb, str(tmp_path / "missing"))


def test_dad_loss_matches_numpy_reference():
    """dad = mean_t w_t·KL_t with w_t = H(p_t, q_t) / mean_s H(p_s, q_s) (module doc), by hand in numpy."""
    rng = np.random.default_rng(1)
    t = rng.normal(size=(2, 3, 7)) * 2
    s = rng.normal(size=(2, 3, 7)) * 2

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(t), log_softmax(s)
    p = np.exp(lp)
    kl = (p * (lp - lq)).sum(-1)
    ce = -(p * lq).sum(-1)  # teacher-student cross-entropy = H(p) + KL
    np.testing.assert_allclose(ce, -(p * lp).sum(-1) + kl, rtol=1e-12)
    want = np.mean(ce / ce.mean() * kl)
    dad, mean_kl = D.token_losses(torch.as_tensor(t), torch.as_tensor(s), "dad")
    plain, _ = D.token_losses(torch.as_tensor(t), torch.as_tensor(s), "kl")
    np.testing.assert_allclose(float(dad), want, rtol=1e-5)
    np.testing.assert_allclose(float(mean_kl), kl.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(plain), kl.mean(), rtol=1e-5)
    # the weight is a constant: the gradient is that of Σ w_t KL_t with w fixed
    ts = torch.as_tensor(s).clone().requires_grad_(True)
    D.token_losses(torch.as_tensor(t), ts, "dad")[0].backward()
    w = torch.as_tensor(ce / ce.mean())
    ts2 = torch.as_tensor(s).clone().requires_grad_(True)
    kl2 = (torch.as_tensor(p) * (torch.as_tensor(lp) - torch.log_softmax(ts2, -1))).sum(-1)
    (w * kl2).mean().backward()
    np.testing.assert_allclose(ts.grad.numpy(), ts2.grad.numpy(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("k,group", [(64, 32), (80, 32), (576, 128)])
def test_fdb_linear_matches_reconstruct_and_autograd(k, group):
    """PlaneLinear's cached-plane forward equals fdb.reconstruct, and its hand-written backward equals
    autograd through the plain formula Σ α_i B_i + μ (padded last group included)."""
    from shiftc.passes.fdb import reconstruct

    rng = np.random.default_rng(0)
    n, q, ng = 24, 2, -(-k // group)
    planes = rng.integers(0, 2, size=(q, n, k)).astype(np.uint8)
    scales = rng.normal(size=(q, n, ng)).astype(np.float32)
    offsets = rng.normal(size=(n, ng)).astype(np.float32)
    m = D.PlaneLinear(planes, scales, offsets, group)
    np.testing.assert_allclose(m.weight_hat().detach().numpy(), reconstruct(planes, scales, offsets, group), rtol=1e-6, atol=1e-6)
    x = torch.as_tensor(rng.normal(size=(3, 5, k)).astype(np.float32))
    gy = torch.as_tensor(rng.normal(size=(3, 5, n)).astype(np.float32))
    (m(x) * gy).sum().backward()
    a = torch.as_tensor(scales).requires_grad_(True)
    mu = torch.as_tensor(offsets).requires_grad_(True)
    w = (a.repeat_interleave(group, -1)[..., :k] * torch.as_tensor(planes).float()).sum(0) + mu.repeat_interleave(group, -1)[:, :k]
    (torch.nn.functional.linear(x, w) * gy).sum().backward()
    np.testing.assert_allclose(m.scales.grad.numpy(), a.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m.offsets.grad.numpy(), mu.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_compress_shiftadd_with_distillation(tiny_llama_dir, smollm2_gguf_path, tmp_path):
    """``shiftc.compress(..., bits=2, distill_steps=N)``: shift-add, then the scales fine-tuned; the
    report carries the distillation's history and the written model runs (function bodies) with
    its exponents changed from the undistilled model's."""
    import shiftc

    src = str(tmp_path / "tiny.onnx")
    shiftc.export(tiny_llama_dir, src)
    kw = dict(bits=2, group=32, calib="wikipedia", calib_windows=2, calib_window=32, tokenizer=smollm2_gguf_path, threads=1)
    plain = shiftc.compress(src, str(tmp_path / "sa.onnx"), **kw)
    r = shiftc.compress(src, str(tmp_path / "sa_d.onnx"), distill_steps=4, **kw)
    assert "distill" not in plain and r["distill"]["steps"] == 4 and r["distill"]["loss"] == "kl"
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(plain["path"]).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(r["path"]).graph.initializer}
    changed = [n for n in a if not np.array_equal(a[n], b[n])]
    assert changed and all(n.endswith(".bcq_exps") for n in changed)
    out = shiftc.load(r["path"]).lm_session().step(np.array([[5, 9, 100]]))
    assert np.isfinite(out).all()
    # the CLI with --distill-planes: the planes are trained too
    from shiftc.cli import main

    qat = str(tmp_path / "sa_qat.onnx")
    assert main(["compress", src, "-o", qat, "--shiftadd-bits", "2", "--group", "32", "--calib-windows", "2",
                 "--calib-window", "32", "--tokenizer", smollm2_gguf_path, "--threads", "1", "--distill-steps", "4",
                 "--distill-planes", "--distill-plane-lr", "1e-3"]) in (0, None)
    c = {t.name: numpy_helper.to_array(t) for t in onnx.load(qat).graph.initializer}
    assert any(n.endswith(".bcq_planes") and not np.array_equal(a[n], c[n]) for n in a)


def test_dev_metrics_against_a_direct_computation(tiny_sa):
    """dev_metrics: KL of a model to itself is 0; NLL is the mean next-token cross-entropy."""
    teacher = D.load_teacher(tiny_sa, None)
    ids = np.random.default_rng(3).integers(0, 49152, size=(2, 9))
    m = D.dev_metrics(teacher, teacher, ids)
    with torch.no_grad():
        logits = teacher(input_ids=torch.as_tensor(ids)).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.as_tensor(ids[:, 1:]).reshape(-1))
    assert abs(m["kl"]) < 1e-6
    np.testing.assert_allclose(m["nll"], float(want), rtol=1e-5)


@pytest.mark.parametrize("coding", ["01", "pm1"])
def test_trained_planes_start_at_the_model_and_follow_the_latent_weights(coding):
    """train_planes(): the latent weights start at Ŵ, so the forward and the planes are unchanged;
    the forward then uses, per weight, the nearest of its group's code values (checked against an
    exhaustive numpy search); the latent gradient is dŴ (straight through) and the scale gradient
    is exact for the chosen codes."""
    rng = np.random.default_rng(1)
    n, q, k, group = 12, (2 if coding == "01" else 3), 80, 32
    ng = -(-k // group)
    planes = rng.integers(0, 2, size=(q, n, k)).astype(np.uint8)
    scales = np.abs(rng.normal(size=(q, n, ng))).astype(np.float32) + 0.1
    offsets = rng.normal(size=(n, ng)).astype(np.float32) if coding == "01" else None
    m = D.PlaneLinear(planes, scales, offsets, group, coding=coding)
    w0 = m.weight_hat().detach().clone()
    m.train_planes()
    # the same sums added in another order: equal up to float32 rounding
    np.testing.assert_allclose(m.weight_hat().detach().numpy(), w0.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(m.planes01(), planes)
    with torch.no_grad():
        m.latent.add_(torch.as_tensor(rng.normal(scale=0.5, size=m.latent.shape).astype(np.float32)))
    # exhaustive reference: every code's value per group, nearest to each latent weight
    pat = m.code_values.numpy()  # [2^q, q]
    mu = np.zeros((n, ng), np.float32) if offsets is None else offsets
    values = np.einsum("qng,cq->ngc", scales, pat) + mu[..., None]
    lat = m.latent.detach().numpy()
    best = np.abs(lat[..., None] - values[:, :, None, :]).argmin(-1)
    want = np.take_along_axis(values[:, :, None, :], best[..., None], -1)[..., 0].reshape(n, -1)[:, :k]
    np.testing.assert_allclose(m.weight_hat().detach().numpy(), want, rtol=0, atol=1e-6)
    x = torch.as_tensor(rng.normal(size=(2, 4, k)).astype(np.float32))
    gy = torch.as_tensor(rng.normal(size=(2, 4, n)).astype(np.float32))
    (m(x) * gy).sum().backward()
    gw = (gy.reshape(-1, n).T @ x.reshape(-1, k)).numpy()  # dL/dŴ [N, K]
    np.testing.assert_allclose(m.latent.grad.reshape(n, -1)[:, :k].numpy(), gw, rtol=1e-4, atol=1e-4)
    p01 = m.planes01()
    s = p01.astype(np.float32) if coding == "01" else 2.0 * p01 - 1
    d_sc = np.stack([np.pad(gw * s[i], ((0, 0), (0, ng * group - k))).reshape(n, ng, group).sum(-1) for i in range(q)])
    np.testing.assert_allclose(m.scales.grad.numpy(), d_sc, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["tiny_sa", "tiny_fdb"])
def test_plane_training_writes_back_the_student(which, request, tmp_path):
    """planes=True: the planes change, and the written-back ONNX model is the trained student
    (BcqMatMul exactly; FdbMatMul up to its float16 scales)."""
    model = request.getfixturevalue(which)
    teacher = D.load_teacher(model, None)
    ids = np.random.default_rng(0).integers(0, 49152, size=(4, 24))
    cfg = D.DistillConfig(steps=12, lr=3e-3, loss="kl", seed=0, planes=True, plane_lr=3e-4)
    out, rep = D.distill(model, teacher, ids, cfg)
    assert rep["planes"] and 0 < rep["plane_bits_changed"] < 0.5
    h = rep["history"]
    assert np.mean([e["kl"] for e in h[-4:]]) < np.mean([e["kl"] for e in h[:4]])
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    changed = {t.name for t in out.graph.initializer if not np.array_equal(numpy_helper.to_array(t), before[t.name])}
    assert any(n.endswith(("_planes")) for n in changed)
    # the student rebuilt from the written-back model computes what the ONNX model does
    student, _ = D.build_student(teacher, out)
    x = np.array([[5, 9, 100, 3000, 17]])
    with torch.no_grad():
        got = student(input_ids=torch.as_tensor(x)).logits.numpy()
    want = _onnx_logits(out, tmp_path, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_training_windows_default_to_one_distinct_window_per_step():
    F = D.DistillFields
    assert D.distill_windows(F(distill_steps=240)) == 240
    assert D.distill_windows(F(distill_steps=5000)) == D.MAX_AUTO_WINDOWS
    assert D.distill_windows(F(distill_minutes=10.0)) == D.AUTO_WINDOWS
    assert D.distill_windows(F(distill_steps=240, distill_windows=64)) == 64
    errors = []
    D.validate_fields(F(distill_windows=-1), lambda flag, msg: errors.append((flag, msg)))
    assert errors and errors[0][0] == "distill_windows"


def test_learning_rate_schedule_follows_the_budget_that_runs_out_first():
    sp = D.schedule_progress
    assert sp(0, 100, 0.0, None) == 0.0
    assert sp(50, 100, 1e6, None) == pytest.approx(0.5)  # no time budget: steps alone
    assert sp(50, 100, 30.0, 1.0) == pytest.approx(0.5)  # half the steps, half the minute
    assert sp(10, 100, 45.0, 1.0) == pytest.approx(0.75)  # time runs out first
    assert sp(10, 10**9, 120.0, 1.0) == 1.0  # --distill-minutes alone: decays to 0 by the deadline
    assert sp(90, 100, 6.0, 1.0) == pytest.approx(0.9)
