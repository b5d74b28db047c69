"""shiftc/passes/fdb.py: Flexible Dual Binarization (2-bit {0,1} planes with float16 scales and
offset) and the 1-bit sign mode, plain and inside GPTQ compensation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shiftc.passes import bcq, fdb


def _layer(seed=0, n=64, k=256):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    x = rng.standard_normal((1024, k)).astype(np.float32)
    x[:, 3] *= 30  # one "massive activation" channel
    return w, (x.T @ x).astype(np.float64)


def test_init_reproduces_the_uniform_grid():
    """Weights exactly on a 2-bit uniform grid s·l + m (l = 0..3) are reconstructed exactly."""
    rng = np.random.default_rng(1)
    s, m = np.float32(2.0 ** -6), np.float32(-2.0 ** -5)
    lv = rng.integers(0, 4, (8, 64))
    lv[:, :4] = [0, 1, 2, 3]  # every level present
    w = (s * lv + m).astype(np.float32)
    alpha, mu = fdb.fit_group(torch.as_tensor(w), 2, iters=0)
    np.testing.assert_array_equal(alpha.numpy(), np.broadcast_to(np.array([[2 * s], [s]], np.float32), (2, 8)))
    np.testing.assert_array_equal(mu.numpy(), np.full(8, m, np.float32))
    r = fdb.quantize(w, "fdb", 64, iters=3)
    np.testing.assert_array_equal(r.dequantize(), w)


def test_result_shapes_storage_and_reconstruction():
    w, _ = _layer(n=20, k=200)  # K not a multiple of the group
    r = fdb.quantize(w, "fdb", 64)
    assert r.codes.shape == (20, 200) and r.codes.max() <= 3
    assert r.scales.shape == (2, 20, 4) and r.scales.dtype == np.float16
    assert r.offsets.shape == (20, 4) and r.offsets.dtype == np.float16
    assert r.packed_planes().shape == (2, 20, 7)
    p = r.planes01().astype(np.float32)
    a = np.repeat(r.scales.astype(np.float32), 64, -1)[..., :200]
    mu = np.repeat(r.offsets.astype(np.float32), 64, -1)[:, :200]
    np.testing.assert_array_equal(r.dequantize(), a[0] * p[0] + a[1] * p[1] + mu)
    assert fdb.bits_per_weight(2, 128) == 2.375 and fdb.bits_per_weight(1, 128) == 1.25
    r1 = fdb.quantize(w, "1bit", 64)
    assert r1.bits == 1 and r1.codes.max() <= 1 and r1.scales.shape == (1, 20, 4)


def test_fit_beats_rtn_and_bcq_on_weights():
    w, _ = _layer(2)
    e_fdb = bcq.relative_weight_error(w, fdb.quantize(w, "fdb", 128).dequantize())
    e_rtn = bcq.relative_weight_error(w, bcq.quantize_rtn(w, 2, 128))
    e_bcq = bcq.relative_weight_error(w, bcq.quantize_bcq(w, 2, 128).dequantize())
    assert e_fdb < 0.8 * e_rtn and e_fdb < e_bcq
    # 1-bit: a sign plane with scale and mean, better than BCQ's 1-bit (no mean) on shifted weights
    ws = w + 0.03
    assert bcq.relative_weight_error(ws, fdb.quantize(ws, "1bit", 128).dequantize()) < \
        bcq.relative_weight_error(ws, bcq.quantize_bcq(ws, 1, 128).dequantize())


def test_refinement_never_worse_than_init():
    w, _ = _layer(3)
    for mode in ("fdb", "1bit"):
        e0 = np.linalg.norm(w - fdb.quantize(w, mode, 64, iters=0).dequantize())
        e8 = np.linalg.norm(w - fdb.quantize(w, mode, 64, iters=8).dequantize())
        assert e8 <= e0 + 1e-6


@pytest.mark.parametrize("mode", ["fdb", "1bit"])
def test_gptq_lowers_output_error(mode):
    w, h = _layer(4)
    plain = bcq.relative_output_error(w, fdb.quantize(w, mode, 128).dequantize(), h)
    comp = bcq.relative_output_error(w, fdb.quantize_gptq(w, h, mode, 128).dequantize(), h)
    ordered = bcq.relative_output_error(w, fdb.quantize_gptq(w, h, mode, 128, act_order=True).dequantize(), h)
    assert comp < 0.8 * plain and ordered < 0.8 * plain
    bcq_err = bcq.relative_output_error(w, bcq.quantize_gptq(w, h, fdb.MODES[mode], 128).dequantize(), h)
    assert comp < bcq_err  # free float16 scales + offset vs power-of-two scales


def test_dead_columns_and_bad_arguments():
    w, h = _layer(5, n=8, k=64)
    h[10, :] = 0
    h[:, 10] = 0
    r = fdb.quantize_gptq(w, h, "fdb", 32)
    assert np.isfinite(r.dequantize()).all()
    with pytest.raises(ValueError, match="mode"):
        fdb.quantize(w, "3bit", 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        fdb.quantize(w, "fdb", 48)
    with pytest.raises(ValueError, match="H has shape"):
        fdb.quantize_gptq(w, h[:32, :32], "fdb", 32)
