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
