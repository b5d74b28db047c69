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
    with pytest.raises(UsageError, match="--binarize"):
        shiftc.compress("unused.onnx", str(tmp_path / "x.onnx"), distill_steps=3)
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
    """FdbLinear's cached-plane forward equals fdb.reconstruct, and its hand-written backward equals
    autograd through the plain formula Σ α_i B_i + μ (padded last group included)."""
    from shiftc.passes.fdb import reconstruct

    rng = np.random.default_rng(0)
    n, q, ng = 24, 2, -(-k // group)
    planes = rng.integers(0, 2, size=(q, n, k)).astype(np.uint8)
    scales = rng.normal(size=(q, n, ng)).astype(np.float32)
    offsets = rng.normal(size=(n, ng)).astype(np.float32)
    m = D.FdbLinear(planes, scales, offsets, group)
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
