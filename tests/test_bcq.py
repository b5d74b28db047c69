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


# -- the fast quantizer against the plain one -------------------------------------------------------
# bcq's fit and GPTQ loop skip work whose outcome is known (candidates already scored, rows whose
# refinement has settled), batch the candidate scoring and run the column steps in numpy. The plain
# torch loops below (the quantizer as first written: every candidate of every plane, every row for
# every round, the column loop in torch) must give the same codes and exponents, bit for bit.


def _ref_lookup(book, w):
    sv, mids, code = book
    pos = torch.zeros(w.shape, dtype=torch.int64)
    for i in range(mids.shape[1]):
        pos += mids[:, i : i + 1] < w
    return code.gather(1, pos), sv.gather(1, pos)


def _ref_err(w, alpha, cw):
    e = (w - _ref_lookup(bcq.codebook(alpha), w)[1]) ** 2
    return (e if cw is None else e * cw).sum(1)


def _ref_choose(w, a, mode, cw):
    lo, hi = bcq.scale_neighbours(a, mode)
    alpha = torch.where(a - lo <= hi - a, lo, hi)
    err = _ref_err(w, alpha, cw)
    cands = [lo, hi] + (list(bcq.scale_neighbours(a, "pow2")) if mode == "pow2x2" else [])
    for i in range(alpha.shape[0]):
        for cand in (c[i] for c in cands):
            alt = alpha.clone()
            alt[i] = cand
            e = _ref_err(w, alt, cw)
            better = e < err
            err = torch.where(better, e, err)
            alpha[i] = torch.where(better, cand, alpha[i])
    return alpha, err


def _ref_fit(w, bits, mode, iters, col_weight):
    cw = None if col_weight is None else (col_weight / col_weight.mean().clamp_min(1e-30)).float()
    r = w.clone()
    a = torch.empty(bits, w.shape[0])
    for i in range(bits):
        a[i] = r.abs().mean(1)
        r -= a[i, :, None] * torch.where(r >= 0, 1.0, -1.0)
    best_alpha, best_err = _ref_choose(w, a, mode, cw)
    alpha = best_alpha.clone()
    signs = bcq._code_signs(bits)
    eye = 1e-4 * w.shape[1] * torch.eye(bits)
    for _ in range(iters):
        B = signs[_ref_lookup(bcq.codebook(alpha), w)[0]]
        Bw = B if cw is None else B * cw[None, :, None]
        a_ls = torch.linalg.solve(Bw.transpose(1, 2) @ B + eye, Bw.transpose(1, 2) @ w[:, :, None])[..., 0].T.abs()
        alpha, err = _ref_choose(w, a_ls, mode, cw)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_alpha[:, better] = alpha[:, better]
    return best_alpha


def _ref_gptq(w, h, group, fit, nearest, damp=0.01, act_order=False):
    W = torch.as_tensor(w).clone()
    n, k = W.shape
    codes = torch.zeros(n, k, dtype=torch.uint8)
    if h is None:
        for g in range(-(-k // group)):
            c0, c1 = g * group, min(k, (g + 1) * group)
            fit(g, W[:, c0:c1].contiguous(), None)
            codes[:, c0:c1] = nearest(g, W[:, c0:c1])[0].to(torch.uint8)
        return codes
    W, H, perm, U = bcq._gptq_setup(W, h, damp, act_order)
    hdiag, U, grp, fitted = torch.diag(H).float(), U.float(), perm // group, set()
    for i1 in range(0, k, group):
        i2 = min(i1 + group, k)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1)
        for j in range(i2 - i1):
            col, g = i1 + j, int(grp[i1 + j])
            if g not in fitted:
                pos = torch.nonzero(grp == g)[:, 0]
                cur = W[:, pos].clone()
                inb = pos < i2
                cur[:, inb] = W1[:, pos[inb] - i1]
                if (~inb).any() and j > 0:
                    cur[:, ~inb] -= Err1[:, :j] @ U[i1:col][:, pos[~inb]]
                fit(g, cur, hdiag[pos])
                fitted.add(g)
            idx, val = nearest(g, W1[:, j : j + 1])
            codes[:, perm[col]] = idx[:, 0].to(torch.uint8)
            err = (W1[:, j] - val[:, 0]) / U[col, col]
            W1[:, j:] -= err[:, None] * U[col, col:i2][None, :]
            Err1[:, j] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return codes


def _ref_quantize(w, h, bits, group, mode, act_order, iters=6):
    alpha, books = torch.zeros(bits, w.shape[0], -(-w.shape[1] // group)), {}

    def fit(g, cur, col_weight):
        alpha[:, :, g] = _ref_fit(cur, bits, mode, iters, col_weight)
        books[g] = bcq.codebook(alpha[:, :, g])

    codes = _ref_gptq(w, h, group, fit, lambda g, col: _ref_lookup(books[g], col), act_order=act_order)
    return codes.numpy(), bcq._alpha_exps(alpha, mode).numpy().astype(np.int8)


def _layer(n, k, seed, massive=True):
    """W [n, k] and H = XᵀX of correlated inputs with one massive channel and one dead input."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1024, 24)) @ rng.standard_normal((24, k)) + 0.1 * rng.standard_normal((1024, k))).astype(np.float32)
    if massive:
        x[:, 7] *= 300
    h = x.T.astype(np.float64) @ x
    h[5, :] = h[:, 5] = 0
    return _gauss(n, k, seed + 1), h


@pytest.mark.parametrize("n,k,bits,group,mode,act_order,calib", [
    (96, 256, 3, 128, "pow2x2", True, True),  # the default recipe
    (130, 320, 2, 64, "pow2", False, True),  # K not a multiple of G
    (40, 192, 4, 64, "pow2x2", True, True),
    (24, 100, 1, 32, "pow2x2", False, True),
    (70, 200, 3, 64, "pow2x2", False, False),  # data-free: group by group
])
def test_fast_quantizer_equals_plain_loops(n, k, bits, group, mode, act_order, calib):
    w, h = _layer(n, k, n)
    r = bcq.quantize_gptq(w, h if calib else None, bits, group, scale_mode=mode, act_order=act_order)
    codes, exps = _ref_quantize(w, h if calib else None, bits, group, mode, act_order)
    np.testing.assert_array_equal(r.codes, codes)
    np.testing.assert_array_equal(r.exps, exps)
    w_hat = r.dequantize()  # from the codes: the numbers of reconstruct(planes01, α)
    np.testing.assert_array_equal(w_hat.view(np.int32), bcq.reconstruct(r.planes01(), r.alpha, group).view(np.int32))


def test_fit_in_row_chunks_equals_one_piece(monkeypatch):
    w = torch.as_tensor(_gauss(300, 128, 9))
    w[:, 3] *= 20
    cw = torch.linspace(0.1, 5.0, 128) ** 2
    whole = bcq.fit_group(w, 3, "pow2x2", 6, cw)
    assert torch.equal(whole, _ref_fit(w, 3, "pow2x2", 6, cw))
    monkeypatch.setattr(bcq, "FIT_ROWS", 64)
    assert torch.equal(bcq.fit_group(w, 3, "pow2x2", 6, cw), whole)


def test_fdb_through_the_shared_loop_equals_plain_loop():
    from shiftc.passes import fdb

    w, h = _layer(80, 256, 11)
    for mode, act_order in (("fdb", True), ("1bit", False)):
        q = fdb.MODES[mode]
        alpha, mu = torch.zeros(q, 80, 2), torch.zeros(80, 2)

        def fit(g, cur, col_weight):
            alpha[:, :, g], mu[:, g] = fdb.fit_group(cur, q, 8, col_weight=col_weight)

        codes = _ref_gptq(w, h, 128, fit, lambda g, col: fdb.nearest(col, alpha[:, :, g], mu[:, g]), act_order=act_order)
        r = fdb.quantize_gptq(w, h, mode, 128, act_order=act_order)
        np.testing.assert_array_equal(r.codes, codes.numpy())
