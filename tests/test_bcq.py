"""shiftc.passes.bcq: binary-coding quantization with power-of-two scales, GPTQ compensation, RTN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shiftc import _native as nat
from shiftc.passes import bcq

torch.set_num_threads(1)

EXACT_ATOL = 1e-7  # binary-coded pow2 matrices are recovered exactly (float32 sums of powers of two)
FIT_MARGIN = 0.9  # each extra plane cuts the relative weight error by at least 10%
GPTQ_GAIN = 0.95  # GPTQ's output error is below 95% of plain BCQ's on correlated inputs


def _gauss(n, k, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05


@pytest.mark.parametrize("mode", ["pow2", "pow2x2"])
def test_fit_error_decreases_with_bits(mode):
    w = _gauss(64, 256)
    errs = [bcq.relative_weight_error(w, bcq.quantize_bcq(w, q, 128, mode).dequantize()) for q in (1, 2, 3, 4)]
    for lo, hi in zip(errs[1:], errs[:-1]):
        assert lo < FIT_MARGIN * hi, errs


@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_exact_for_binary_coded_pow2(q, mode="pow2"):
    # (pow2x2 holds these matrices too, but its greedy start can settle in another local optimum)
    rng = np.random.default_rng(q)
    n, k, g = 16, 200, 64  # K not a multiple of G or 32
    ng = -(-k // g)
    e0 = rng.integers(-8, -2, size=(n, ng))
    alpha = np.stack([np.exp2(e0 - i).astype(np.float32) for i in range(q)])  # α_i = 2^(e0 - i)
    planes = rng.integers(0, 2, size=(q, n, k)).astype(np.uint8)
    w = bcq.reconstruct(planes, alpha, g)
    r = bcq.quantize_bcq(w, q, g, mode)
    np.testing.assert_allclose(r.dequantize(), w, rtol=0, atol=EXACT_ATOL)


def test_gptq_reduces_output_error_on_correlated_inputs():
    rng = np.random.default_rng(1)
    k = 256
    # strongly correlated: a rank-32 signal plus a little noise
    x = (rng.standard_normal((2048, 32)) @ rng.standard_normal((32, k)) + 0.1 * rng.standard_normal((2048, k))).astype(np.float32)
    h = x.T.astype(np.float64) @ x
    w = _gauss(96, k, 2)
    for q in (2, 3):
        plain = bcq.quantize_bcq(w, q, 64).dequantize()
        comp = bcq.quantize_gptq(w, h, q, 64).dequantize()
        ordered = bcq.quantize_gptq(w, h, q, 64, act_order=True).dequantize()
        e_plain = bcq.relative_output_error(w, plain, h)
        assert bcq.relative_output_error(w, comp, h) < GPTQ_GAIN * e_plain
        assert bcq.relative_output_error(w, ordered, h) < GPTQ_GAIN * e_plain
        # the H-based metric is the measured one: ‖XWᵀ − XŴᵀ‖ / ‖XWᵀ‖
        direct = np.linalg.norm(x @ (w - comp).T) / np.linalg.norm(x @ w.T)
        assert abs(direct - bcq.relative_output_error(w, comp, h)) < 1e-3


@pytest.mark.parametrize("mode", ["pow2", "pow2x2"])
def test_scales_are_representable_and_exponents_round_trip(mode):
    w = _gauss(32, 128, 3)
    r = bcq.quantize_bcq(w, 3, 32, mode)
    assert r.exps.dtype == np.int8 and r.exps.shape == (3, 32, 4, bcq.SCALE_MODES[mode])
    a = torch.as_tensor(r.alpha)
    assert (a > 0).all()
    lo, hi = bcq.scale_neighbours(a, mode)
    assert torch.equal(lo, a) and (hi >= a).all()  # already on the grid: α is its own lower neighbour
    assert ((r.exps >= bcq.E_MIN) | (r.exps == bcq.NO_TERM)).all()
    zero = bcq.round_scales(torch.zeros(3), mode)
    assert (zero[0] == 0).all() and (zero[1] == bcq.NO_TERM).all()


def test_pow2_rounding_is_nearest():
    a = torch.tensor([1.0, 1.4, 1.6, 0.3, 5.9, 2.0**-20])
    val, e = bcq.round_scales(a, "pow2")
    assert val.tolist() == [1.0, 1.0, 2.0, 0.25, 4.0, 2.0**-20]
    assert e[..., 0].tolist() == [0, 0, 1, -2, 2, -20]
    val2, _ = bcq.round_scales(torch.tensor([1.5, 3.0, 0.75]), "pow2x2")
    assert val2.tolist() == [1.5, 3.0, 0.75]


def test_packing_matches_native():
    bits = np.random.default_rng(4).integers(0, 2, size=(3, 7, 100)).astype(np.uint8)
    packed = bcq.pack_planes(bits)
    assert packed.dtype == np.uint32 and packed.shape == (3, 7, 4)
    for i in range(3):
        np.testing.assert_array_equal(packed[i], nat.pack_bits(bits[i]))
    np.testing.assert_array_equal(bcq.unpack_planes(packed, 100), bits)


def test_gptq_uniform_reference():
    """The uniform-grid GPTQ baseline: each group of each row holds at most 2^q distinct values on an
    evenly spaced grid that includes 0, and compensation beats RTN's output error."""
    rng = np.random.default_rng(3)
    k, g, q = 256, 64, 3
    x = (rng.standard_normal((2048, 32)) @ rng.standard_normal((32, k)) + 0.1 * rng.standard_normal((2048, k))).astype(np.float32)
    h = x.T.astype(np.float64) @ x
    w = _gauss(48, k, 4)
    wq = bcq.quantize_gptq_uniform(w, h, q, g)
    for row in wq[:8]:
        for c in range(0, k, g):
            vals = np.unique(row[c : c + g])
            assert len(vals) <= 2**q
            steps = np.diff(vals)
            step = steps.min()
            np.testing.assert_allclose(steps / step, np.round(steps / step), atol=1e-3)  # one grid
    e_rtn = bcq.relative_output_error(w, bcq.quantize_rtn(w, q, g), h)
    assert bcq.relative_output_error(w, wq, h) < GPTQ_GAIN * e_rtn


def test_rtn_and_bits_per_weight():
    w = _gauss(64, 300, 5)
    errs = [bcq.relative_weight_error(w, bcq.quantize_rtn(w, q, 128)) for q in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.01
    assert bcq.bits_per_weight(3, 128, "pow2") == 3.1875  # csrc/include/shiftc/packed.h
    assert bcq.bits_per_weight(3, 128, "pow2x2") == 3.375
    assert bcq.bits_per_weight(3, 128, method="rtn") == 3 + 35 / 128


def test_bad_arguments():
    w = _gauss(4, 64)
    for kwargs in ({"bits": 0, "group": 32}, {"bits": 5, "group": 32}, {"bits": 2, "group": 48}):
        with pytest.raises(ValueError):
            bcq.quantize_bcq(w, **kwargs)
