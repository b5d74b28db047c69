"""The lut16 kernels of ai.shiftc::BcqMatMul (csrc/kernels/bcq_lut.cc, layout in
csrc/include/shiftc/bcq_lut.h) through shiftc._native, against the float64 numpy reference
shiftc.passes.ops.bcq_matmul_ref, for every ISA this CPU has.

Tolerance: the kernels sum signed columns per plane and scale the sums, and a "01" plane runs as
a +-1 plane plus an offset, so every intermediate is bounded by
S[m, n] = sum_k |x[m, k]| A[n, k],  A[n, k] = sum_i alpha_i[n, g(k)]  (>= |w[n, k]|),
and a float32 kernel's error on output (m, n) is a few float32 epsilons times S whatever the
summation order: every output must satisfy |y - ref| <= RTOL * S. (S, not sum_k |x||w|: a weight
that cancels to 0, e.g. "01" bit 0, still goes through +-alpha/2 terms.)

The AMX GEMM (ISA "amx", M >= BCQ_AMX_MIN_M) multiplies bf16 parts of x and w and has its own,
looser bound RTOL_BF16X3 (derived where it is defined); every other path keeps RTOL.

Uniform weights (bcq_matmul_uniform), W[n, k] = mu[n, g] + s[n, g] sum_i 2^i B_i[n, k] with half
s >= 0 and mu, run as the +-1 form with alpha_i = s 2^(i-1) and offset mu + s (2^q - 1)/2. Every
intermediate (partials, scaled partials, offset term, expanded weight) is then bounded by
U[m, n] = sum_k |x[m, k]| (|mu[n, g(k)]| + s[n, g(k)] (2^q - 1)), so the same reasoning gives
|y - ref| <= RTOL * U per output, on every ISA (ISA "amx" runs their GEMM on the AVX-512 FMA
kernel, not on bf16 tiles).
"""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest

from shiftc import _native as nat
from shiftc.passes.bcq import NO_TERM, exps_to_alpha, pack_planes, reconstruct, unpack_planes
from shiftc.passes.ops import bcq_matmul_ref

RTOL = 1e-5  # relative to sum_k |x_k| |w_nk|, per output
# AMX (bcq_lut.cc): x = x_hi + x_mid + x_lo exactly (three bf16 parts hold float's 24 bits), and
# w = w_hi + w_lo + e_w with w_hi = bf16(w), w_lo = bf16(w - w_hi); bf16 rounds to 8 significant
# bits, unit roundoff u = 2^-8, so |e_w| <= u |w - w_hi| <= u^2 |w|. The kernel sums x w_hi (three
# products) and, where a w_lo is non-zero, x w_lo (three more), so it misses only x e_w: at most
# u^2 |x| |w| = 2^-16 |x| |w| per product (0 where w has at most 16 significant bits), against
# |w| <= A of the module docstring. The bf16 products are exact in float and the tiles accumulate
# in float, which RTOL already covers, so the two add up.
RTOL_BF16X3 = 2.0**-16 + RTOL
MAX_M = nat.BCQ_LUT_MAX_M  # rows of X below which prepare builds tables (the GEMV path)
AMX_MIN_M = nat.BCQ_AMX_MIN_M  # rows of X from which ISA "amx" runs the GEMM on AMX tiles
# both sides of MAX_M and of the kernels' per-bit-width cutoffs below it (6, 8, 12), and of AMX_MIN_M
M_VALUES = sorted({1, 2, 3, 5, 6, 7, 8, MAX_M - 1, MAX_M, AMX_MIN_M - 1, AMX_MIN_M, 17, 130} - {0})
ISAS = ["scalar", "avx2", "avx512", "amx"]


def amx_available() -> bool:
    try:
        nat.bcq_set_isa("amx")
    except ValueError:
        return False
    finally:
        nat.bcq_set_isa("auto")
    return True


# AMX is a plain skip even under SHIFTC_REQUIRE_ALL=1: CI machines need not have it (it is not an
# optional tool that CI installs, it is the CPU)
NO_AMX = "this CPU lacks AMX-BF16 (or the OS does not permit AMX tile data)"


def rtol_for(isa: str, m: int) -> float:
    return RTOL_BF16X3 if isa == "amx" and m >= AMX_MIN_M else RTOL


@contextlib.contextmanager
def kernels_on(isa: str):
    """The lut16 kernels forced to ``isa`` (a skip where this CPU/build lacks it: hardware, never a
    CI failure); the ISA and the table mode restored after."""
    try:
        nat.bcq_set_isa(isa)
    except ValueError as e:
        pytest.skip(NO_AMX if isa == "amx" else f"this CPU/build lacks ISA {isa}: {e}")
    before = nat.bcq_tables()
    try:
        yield
    finally:
        nat.bcq_set_isa("auto")
        nat.bcq_set_tables(before)


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with the lut16 kernels forced to one ISA and float32 GEMV tables (exact up to
    float rounding: the int8 tables of the AVX-512 uniform GEMV have their own test and bound);
    restore the defaults after."""
    with kernels_on(request.param):
        nat.bcq_set_tables("float32")
        yield request.param


def make_weights(rng, q: int, n: int, k: int, group: int):
    """Random bit planes and power-of-two scales, some of them sums of two powers (pow2x2) and
    some zero (both terms NO_TERM), as the shift-add pass emits them."""
    ng = -(-k // group)
    planes01 = rng.integers(0, 2, (q, n, k), dtype=np.uint8)
    exps = rng.integers(-7, 1, (q, n, ng, 2)).astype(np.int8)
    exps[..., 1] = np.where(rng.random((q, n, ng)) < 0.5, NO_TERM, exps[..., 1])
    exps[rng.random((q, n, ng)) < 0.02] = NO_TERM
    return pack_planes(planes01), exps


def error_scale(x: np.ndarray, exps: np.ndarray, k: int, group: int) -> np.ndarray:
    """S [M, N] of the module docstring."""
    a = np.repeat(exps_to_alpha(exps).astype(np.float64).sum(axis=0), group, axis=-1)[:, :k]  # A [N, K]
    return np.abs(x.astype(np.float64)) @ a.T


def check(y: np.ndarray, x: np.ndarray, planes: np.ndarray, exps: np.ndarray, *, q: int, k: int, group: int,
          coding: str, what: str, rtol: float = RTOL) -> None:
    ref = bcq_matmul_ref(x, planes, exps, bits=q, group_size=group, in_features=k, coding=coding)
    bound = error_scale(x, exps, k, group)
    assert y.shape == ref.shape and y.dtype == np.float32, what
    err = np.abs(y.astype(np.float64) - ref.astype(np.float64))
    bad = err > rtol * bound + 1e-30
    assert not bad.any(), f"{what}: {bad.sum()} outputs off, worst err/bound {np.max(err / np.maximum(bound, 1e-30)):.3g}"


def run(x, planes, exps, *, q, k, group, coding, threads=1):
    codes, scales, offsets = nat.bcq_pack_lut16(planes, exps_to_alpha(exps), k, group, coding)
    return nat.bcq_matmul_lut16(x, codes, scales, offsets, planes.shape[1], k, q, group, threads=threads)


# -- correctness --------------------------------------------------------------------------------


@pytest.mark.parametrize("coding", ["pm1", "01"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_every_bits_group_coding_and_m(isa, q, group, coding):
    """N=17 (one full and one partial row block, a half task), K=576 (G=128: last group partial),
    every M of both paths."""
    rng = np.random.default_rng(q * 100 + group)
    n, k = 17, 576
    planes, exps = make_weights(rng, q, n, k, group)
    for m in M_VALUES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = run(x, planes, exps, q=q, k=k, group=group, coding=coding)
        check(y, x, planes, exps, q=q, k=k, group=group, coding=coding, what=f"{isa} q={q} G={group} {coding} M={m}",
              rtol=rtol_for(isa, m))


# (N, K) grid; bits, group and coding rotate over it so that each shape meets several of them.
SHAPES = list(itertools.product([1, 17, 576, 1536], [64, 576, 1536]))


@pytest.mark.parametrize("n,k", SHAPES)
def test_shapes(isa, n, k):
    i = SHAPES.index((n, k))
    q, group, coding = 1 + i % 4, (32, 64, 128)[i % 3], ("pm1", "01")[i % 2]
    rng = np.random.default_rng(i)
    planes, exps = make_weights(rng, q, n, k, group)
    # the large shapes only at the M of each path's edge, to keep the scalar ISA quick
    ms = [1, MAX_M - 1, MAX_M, 130] if n * k <= 576 * 576 else [1, MAX_M]
    for m in sorted(set(ms) - {0}):
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = run(x, planes, exps, q=q, k=k, group=group, coding=coding)
        check(y, x, planes, exps, q=q, k=k, group=group, coding=coding, what=f"{isa} N={n} K={k} q={q} G={group} M={m}",
              rtol=rtol_for(isa, m))


@pytest.mark.parametrize("k", [1, 7, 31, 33, 61, 100, 200])
def test_k_not_a_multiple_of_8_or_32(isa, k):
    """Columns >= K inside the last octet/word/group contribute nothing."""
    rng = np.random.default_rng(k)
    n, q, group = 40, 3, 32
    for coding in ("pm1", "01"):
        planes, exps = make_weights(rng, q, n, k, group)
        for m in (1, MAX_M, 20):
            x = rng.standard_normal((m, k)).astype(np.float32)
            y = run(x, planes, exps, q=q, k=k, group=group, coding=coding)
            check(y, x, planes, exps, q=q, k=k, group=group, coding=coding, what=f"{isa} K={k} {coding} M={m}",
                  rtol=rtol_for(isa, m))


@pytest.mark.parametrize("m", [1, MAX_M, 130])
def test_threads_match_one_thread(isa, m):
    """Tasks are independent: two threads give bit-identical results."""
    rng = np.random.default_rng(m)
    n, k, q, group = 576, 576, 2, 128
    planes, exps = make_weights(rng, q, n, k, group)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y1 = run(x, planes, exps, q=q, k=k, group=group, coding="01", threads=1)
    y2 = run(x, planes, exps, q=q, k=k, group=group, coding="01", threads=2)
    np.testing.assert_array_equal(y1, y2)
    check(y2, x, planes, exps, q=q, k=k, group=group, coding="01", what=f"{isa} threads=2 M={m}", rtol=rtol_for(isa, m))


def test_isas_agree():
    """Every available ISA gives the same outputs up to summation order (they build identical
    tables and expanded weights)."""
    rng = np.random.default_rng(7)
    n, k, q, group = 48, 320, 3, 64
    planes, exps = make_weights(rng, q, n, k, group)
    xs = [rng.standard_normal((m, k)).astype(np.float32) for m in (1, 130)]
    outs = {}
    for isa in ISAS:
        try:
            nat.bcq_set_isa(isa)
        except ValueError:
            continue
        outs[isa] = [run(x, planes, exps, q=q, k=k, group=group, coding="pm1") for x in xs]
    nat.bcq_set_isa("auto")
    base = outs.pop("scalar")
    for isa, ys in outs.items():
        for x, a, b in zip(xs, ys, base):
            bound = error_scale(x, exps, k, group)
            assert np.all(np.abs(a - b) <= (RTOL + rtol_for(isa, len(x))) * bound), isa


# -- AMX ------------------------------------------------------------------------------------------


@pytest.fixture
def amx():
    if not amx_available():
        pytest.skip(NO_AMX)
    nat.bcq_set_isa("amx")
    yield
    nat.bcq_set_isa("auto")


@pytest.mark.parametrize("m", [AMX_MIN_M, AMX_MIN_M + 1, 31, 32, 33, 48, 100])
@pytest.mark.parametrize("n,k", [(33, 100), (64, 576), (17, 1100)])
def test_amx_row_blocks_and_edges(amx, m, n, k):
    """The AMX GEMM pads rows to 16-row blocks (pairs of them, and a lone last one), columns to 32
    (K not a multiple of 32, the task's second half past N) and K-slices (K = 1100 > 512);
    make_weights' sums of two powers of two give k-steps with and without bf16-exact weights."""
    i = m + n + k
    q, group, coding = 1 + i % 4, (32, 64, 128)[i % 3], ("pm1", "01")[i % 2]
    rng = np.random.default_rng(i)
    planes, exps = make_weights(rng, q, n, k, group)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = run(x, planes, exps, q=q, k=k, group=group, coding=coding)
    check(y, x, planes, exps, q=q, k=k, group=group, coding=coding, what=f"amx M={m} N={n} K={k} q={q} G={group}",
          rtol=RTOL_BF16X3)


def _run_alpha(x, planes01, alpha, *, q, k, group, coding):
    """The kernel and a float64 reference for arbitrary float scales (not exponents)."""
    codes, scales, offsets = nat.bcq_pack_lut16(pack_planes(planes01), alpha, k, group, coding)
    y = nat.bcq_matmul_lut16(x, codes, scales, offsets, planes01.shape[1], k, q, group)
    w = reconstruct(planes01, alpha, group, coding).astype(np.float64)
    a = np.repeat(np.abs(alpha).astype(np.float64).sum(axis=0), group, axis=-1)[:, :k]
    x64 = x.astype(np.float64)
    return y, x64 @ w.T, np.abs(x64) @ a.T


@pytest.mark.parametrize("coding", ["pm1", "01"])
def test_amx_weights_exact_or_not_in_bf16(amx, coding):
    """Scales that are single powers of two over a narrow range expand to weights exact in bf16:
    the AMX GEMM then multiplies exactly and meets the float bound RTOL. Arbitrary float scales
    need the w_lo products and meet RTOL_BF16X3."""
    rng = np.random.default_rng(11)
    m, n, k, q, group = 64, 48, 320, 3, 64
    planes01 = rng.integers(0, 2, (q, n, k), dtype=np.uint8)
    x = rng.standard_normal((m, k)).astype(np.float32)
    pow2 = np.exp2(rng.integers(-6, -1, (q, n, k // group))).astype(np.float32)
    y, ref, bound = _run_alpha(x, planes01, pow2, q=q, k=k, group=group, coding=coding)
    assert np.all(np.abs(y - ref) <= RTOL * bound), "bf16-exact weights"
    floats = (rng.random((q, n, k // group)) * 0.1 + 0.01).astype(np.float32)
    y, ref, bound = _run_alpha(x, planes01, floats, q=q, k=k, group=group, coding=coding)
    assert np.all(np.abs(y - ref) <= RTOL_BF16X3 * bound), "weights not exact in bf16"


def test_amx_reconverts_x_after_prepare(amx):
    """Each thread keeps X's bf16 tiles from one call to the next while nothing prepared since:
    new contents in the same buffer (prepared again by the next call) must be used."""
    rng = np.random.default_rng(5)
    m, n, k, q, group = 40, 96, 640, 3, 128
    planes, exps = make_weights(rng, q, n, k, group)
    x = rng.standard_normal((m, k)).astype(np.float32)
    for _ in range(3):
        y = run(x, planes, exps, q=q, k=k, group=group, coding="pm1")
        check(y, x, planes, exps, q=q, k=k, group=group, coding="pm1", what="amx in-place x", rtol=RTOL_BF16X3)
        x[...] = rng.standard_normal((m, k)).astype(np.float32)  # same buffer, new contents


def test_amx_large_x_converted_per_slice(amx):
    """An X whose tiles exceed the per-thread cache (32 MiB) is converted slice by slice."""
    rng = np.random.default_rng(6)
    m, n, k, q, group = 1040, 40, 8192, 2, 128  # 1040 x 8192 x 4 bytes = 32.5 MiB
    planes, exps = make_weights(rng, q, n, k, group)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = run(x, planes, exps, q=q, k=k, group=group, coding="01")
    check(y, x, planes, exps, q=q, k=k, group=group, coding="01", what="amx large X", rtol=RTOL_BF16X3)


# -- layout ---------------------------------------------------------------------------------------


def np_pack_lut16(planes01: np.ndarray, alpha: np.ndarray, k: int, group: int, coding: str):
    """numpy transcription of the lut16 layout in shiftc/bcq_lut.h."""
    q, n, _ = planes01.shape
    ng = -(-k // group)
    kp, nb = ng * group, -(-n // 16)
    bits = np.zeros((q, nb * 16, kp), np.uint8)
    bits[:, :n, :k] = planes01
    # codes [NB][Kp/8][q][16]: byte r = bits 8o..8o+7 of row 16b+r, bit j = column 8o+j
    octets = np.packbits(bits.reshape(q, nb * 16, kp // 8, 8), axis=-1, bitorder="little")[..., 0]
    codes = octets.reshape(q, nb, 16, kp // 8).transpose(1, 3, 0, 2)
    a = np.zeros((q, nb * 16, ng), np.float32)
    a[:, :n] = alpha * (0.5 if coding == "01" else 1.0)
    scales = a.reshape(q, nb, 16, ng).transpose(1, 3, 0, 2)
    offsets = a.sum(axis=0).reshape(nb, 16, ng).transpose(0, 2, 1) if coding == "01" else None
    return codes.ravel(), scales.ravel(), None if offsets is None else offsets.ravel()


@pytest.mark.parametrize("coding", ["pm1", "01"])
@pytest.mark.parametrize("q,n,k,group", [(1, 1, 64, 32), (3, 17, 576, 128), (4, 40, 100, 64), (2, 33, 33, 32)])
def test_pack_layout(q, n, k, group, coding):
    rng = np.random.default_rng(n)
    planes01 = rng.integers(0, 2, (q, n, k), dtype=np.uint8)
    alpha = np.exp2(rng.integers(-6, 1, (q, n, -(-k // group)))).astype(np.float32)
    got = nat.bcq_pack_lut16(pack_planes(planes01), alpha, k, group, coding)
    want = np_pack_lut16(planes01, alpha, k, group, coding)
    assert got[0].dtype == np.uint8 and got[1].dtype == np.float32
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    if coding == "pm1":
        assert got[2] is None
    else:
        np.testing.assert_array_equal(got[2], want[2])


def test_pack_ignores_set_padding_bits():
    """Bits set beyond K in the last word (not allowed by packed.h, but cheap to tolerate) are
    dropped: the codes equal those of the clean planes."""
    rng = np.random.default_rng(3)
    q, n, k, group = 2, 5, 40, 32
    planes = pack_planes(rng.integers(0, 2, (q, n, k), dtype=np.uint8))
    dirty = planes.copy()
    dirty[..., -1] |= np.uint32(0xFFFFFF00)  # columns 40..63
    alpha = np.ones((q, n, 2), np.float32)
    np.testing.assert_array_equal(nat.bcq_pack_lut16(dirty, alpha, k, group)[0], nat.bcq_pack_lut16(planes, alpha, k, group)[0])


# -- ISA selection and bad arguments ----------------------------------------------------------------


def test_isa_selection():
    assert nat.bcq_set_isa("scalar") == "scalar" and nat.bcq_isa() == "scalar"
    best = nat.bcq_set_isa("auto")
    assert best in ISAS and nat.bcq_isa() == best
    with pytest.raises(ValueError, match="name must be"):
        nat.bcq_set_isa("sse4")
    assert nat.bcq_isa() == best


@pytest.fixture(scope="module")
def packed():
    rng = np.random.default_rng(0)
    q, n, k, group = 2, 20, 96, 32
    planes, exps = make_weights(rng, q, n, k, group)
    codes, scales, _ = nat.bcq_pack_lut16(planes, exps_to_alpha(exps), k, group, "pm1")
    _, _, offsets = nat.bcq_pack_lut16(planes, exps_to_alpha(exps), k, group, "01")
    x = rng.standard_normal((3, k)).astype(np.float32)
    return dict(x=x, codes=codes, scales=scales, offsets=offsets, N=n, K=k, bits=q, group=group)


@pytest.mark.parametrize("change,match", [
    (dict(x=np.zeros((3, 95), np.float32)), "x must have shape"),
    (dict(x=np.zeros(96, np.float32)), "x must be 2-D"),
    (dict(x=np.zeros((3, 96), np.int32)), "x must be a float array"),
    (dict(codes="int8"), "codes must be uint8"),
    (dict(codes="short"), "codes must hold"),
    (dict(scales="float64"), "scales must be float32"),
    (dict(scales="short"), "scales must hold"),
    (dict(offsets="short"), "offsets must hold"),
    (dict(N=0), "N must be >= 1"),
    (dict(N=40), "codes must hold"),
    (dict(K=0), "K must be >= 1"),
    (dict(bits=0), "bits must be in 1..4"),
    (dict(bits=5), "bits must be in 1..4"),
    (dict(group=48), "group must be a positive multiple of 32"),
    (dict(threads=0), "threads must be >= 1"),
])
def test_matmul_rejects_bad_arguments(packed, change, match):
    args = dict(packed, threads=1)
    for key, val in change.items():
        if isinstance(val, str) and val == "short":
            val = args[key][:-1]
        elif isinstance(val, str):
            val = args[key].astype(val)
        args[key] = val
    with pytest.raises(ValueError, match=f"bcq_matmul_lut16: {match}"):
        nat.bcq_matmul_lut16(**args)


def test_pack_rejects_bad_arguments():
    planes = np.zeros((2, 4, 3), np.uint32)  # K in 65..96
    alpha = np.ones((2, 4, 3), np.float32)  # G = 32
    with pytest.raises(ValueError, match="bcq_pack_lut16: coding must be"):
        nat.bcq_pack_lut16(planes, alpha, 96, 32, "pm2")
    with pytest.raises(ValueError, match="bcq_pack_lut16: planes must have shape"):
        nat.bcq_pack_lut16(planes, alpha, 200, 32)
    with pytest.raises(ValueError, match="bcq_pack_lut16: alpha must have shape"):
        nat.bcq_pack_lut16(planes, alpha, 96, 64)
    with pytest.raises(ValueError, match="bcq_pack_lut16: group must be"):
        nat.bcq_pack_lut16(planes, alpha, 96, 40)
    with pytest.raises(ValueError, match="bcq_pack_lut16: planes must hold 1..4"):
        nat.bcq_pack_lut16(np.zeros((5, 4, 3), np.uint32), np.ones((5, 4, 3), np.float32), 96, 32)
    with pytest.raises(ValueError, match="bcq_pack_lut16: K must be >= 1"):
        nat.bcq_pack_lut16(planes, alpha, 0, 32)


# -- uniform scales (half s, mu per row and group) --------------------------------------------------


def make_uniform(rng, q: int, n: int, k: int, group: int):
    """Random bit planes, float16 s >= 0 (about 5% exactly 0) and mu of both signs."""
    ng = -(-k // group)
    planes01 = rng.integers(0, 2, (q, n, k), dtype=np.uint8)
    s = (rng.random((n, ng)) * 0.1).astype(np.float16)
    s[rng.random((n, ng)) < 0.05] = 0
    mu = ((rng.random((n, ng)) - 0.5) * 2.0).astype(np.float16)
    return planes01, s, mu


def uniform_ref(x: np.ndarray, planes01: np.ndarray, s: np.ndarray, mu: np.ndarray, k: int, group: int):
    """float64 Y = X W^T of the uniform formula, and U [M, N] of the module docstring."""
    q = planes01.shape[0]
    code = sum(planes01[i].astype(np.float64) * 2.0**i for i in range(q))  # [N, K]
    sk = np.repeat(s.astype(np.float64), group, axis=-1)[:, :k]
    mk = np.repeat(mu.astype(np.float64), group, axis=-1)[:, :k]
    x64 = x.astype(np.float64)
    return x64 @ (mk + sk * code).T, np.abs(x64) @ (np.abs(mk) + sk * (2**q - 1)).T


def run_uniform(x, planes01, s, mu, *, k, group, threads=1):
    q, n = planes01.shape[:2]
    codes = nat.bcq_pack_codes(pack_planes(planes01), k, group)
    su = nat.bcq_pack_uniform(s, mu, k, group)
    return nat.bcq_matmul_uniform(x, codes, su, n, k, q, group, threads=threads)


def check_uniform(y, x, planes01, s, mu, *, k, group, what):
    ref, bound = uniform_ref(x, planes01, s, mu, k, group)
    assert y.shape == ref.shape and y.dtype == np.float32, what
    err = np.abs(y.astype(np.float64) - ref)
    bad = err > RTOL * bound + 1e-30
    assert not bad.any(), f"{what}: {bad.sum()} outputs off, worst err/bound {np.max(err / np.maximum(bound, 1e-30)):.3g}"


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_uniform_every_bits_group_and_m(isa, q, group):
    """N=17 and 40 (partial row blocks, a half task), K=576 (G=128: last group partial) and
    K=100 (no group whole for G=128), every M of both paths."""
    rng = np.random.default_rng(q * 1000 + group)
    for n, k in ((17, 576), (40, 100)):
        planes01, s, mu = make_uniform(rng, q, n, k, group)
        for m in M_VALUES:
            x = rng.standard_normal((m, k)).astype(np.float32)
            y = run_uniform(x, planes01, s, mu, k=k, group=group)
            check_uniform(y, x, planes01, s, mu, k=k, group=group, what=f"{isa} uniform q={q} G={group} N={n} K={k} M={m}")


@pytest.mark.parametrize("k", [1, 7, 20, 31, 33, 61, 200])
def test_uniform_k_small_or_not_a_multiple_of_the_group(isa, k):
    """Columns >= K inside the last octet/word/group contribute nothing (mu included)."""
    rng = np.random.default_rng(k)
    n = 21
    for q, group in ((4, 32), (2, 64)):
        planes01, s, mu = make_uniform(rng, q, n, k, group)
        for m in (1, 5, MAX_M, 20):
            x = rng.standard_normal((m, k)).astype(np.float32)
            y = run_uniform(x, planes01, s, mu, k=k, group=group)
            check_uniform(y, x, planes01, s, mu, k=k, group=group, what=f"{isa} uniform K={k} q={q} G={group} M={m}")


@pytest.mark.parametrize("m", [1, 20])
def test_uniform_every_half(isa, m):
    """One group per row (K = G = 32), so each output checks its row's (s, mu) alone: s over
    every finite non-negative half (subnormals and 65504 included), mu over every finite half
    (both signs), exactly as the kernels convert them."""
    rng = np.random.default_rng(m)
    finite = np.arange(0x7C00, dtype=np.uint16)  # +0 .. 65504
    n, k, q, group = finite.size, 32, 4, 32
    s = finite.view(np.float16).reshape(n, 1)
    mu_bits = rng.permutation(finite) | (rng.integers(0, 2, n, dtype=np.uint16) << 15)
    mu = mu_bits.view(np.float16).reshape(n, 1)
    planes01 = rng.integers(0, 2, (q, n, k), dtype=np.uint8)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = run_uniform(x, planes01, s, mu, k=k, group=group)
    check_uniform(y, x, planes01, s, mu, k=k, group=group, what=f"{isa} uniform every half M={m}")


@pytest.mark.parametrize("m", [1, MAX_M, 130])
def test_uniform_threads_match_one_thread(isa, m):
    rng = np.random.default_rng(m)
    n, k, q, group = 200, 576, 4, 32
    planes01, s, mu = make_uniform(rng, q, n, k, group)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y1 = run_uniform(x, planes01, s, mu, k=k, group=group, threads=1)
    y2 = run_uniform(x, planes01, s, mu, k=k, group=group, threads=2)
    np.testing.assert_array_equal(y1, y2)
    check_uniform(y2, x, planes01, s, mu, k=k, group=group, what=f"{isa} uniform threads=2 M={m}")


# rows of X from which each bit width runs the int8 GEMM
GEMM_FROM_M = {1: 6, 2: 5, 3: 2, 4: 2}  # bcq_lut.cc kLutRowsBelowX8 (AVX2, int8 mode)


def t8_fits(q: int, group: int) -> bool:
    """bcq_lut.cc t8_fits: the int8 GEMV runs where a group's weighted sum of biased lookups fits 16 bits."""
    return 2 * 255 * (group // 8) * (2**q - 1) < 65536


def t8_bound(x: np.ndarray, s: np.ndarray, q: int, k: int, group: int) -> np.ndarray:
    """Worst error [M, N] of the int8 tables: per row m and group g the entries are rounded to
    multiples of a_mg / 127 (a_mg = the group's largest table entry = max over its quads of
    sum |x|), so each lookup is off by at most a_mg / 254; a plane's partial sums nq_g lookups
    (the group's quads inside K), the planes are weighted by 2^i and scaled by s/2."""
    m, ng = x.shape[0], s.shape[1]
    ax = np.zeros((m, ng * group), np.float64)
    ax[:, :k] = np.abs(x.astype(np.float64))
    quad = ax.reshape(m, ng, group // 4, 4).sum(-1)  # [M, NG, quads]
    amax = quad.max(-1)  # [M, NG]
    nq = np.array([min(group // 4, max(0, -(-(k - g * group) // 4))) for g in range(ng)], np.float64)
    per = amax / 254.0 * nq * (2**q - 1)  # [M, NG]
    return per @ (s.astype(np.float64).T / 2.0)


@pytest.mark.parametrize("simd", ["avx2", "avx512"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_uniform_int8_tables(q, group, simd):
    """The AVX2 / AVX-512 GEMV on int8 tables (the default there) within t8_bound of the exact
    product, for decode-sized M (below every bit width's table cutoff), partial groups and blocks,
    1 and 2 threads; it must differ from the float32 tables where it runs (t8_fits) and equal them
    bit for bit where it does not."""
    rng = np.random.default_rng(7 * q + group)
    with kernels_on(simd):
        for n, k in ((17, 576), (40, 100), (200, 1536)):
            planes01, s, mu = make_uniform(rng, q, n, k, group)
            # (on AVX2, more rows than GEMM_FROM_M run the int8 GEMM instead: test_uniform_int8_gemm)
            for m in [m for m in (1, 2, 3, 5) if simd == "avx512" or m < GEMM_FROM_M[q]]:
                x = rng.standard_normal((m, k)).astype(np.float32)
                x[:, rng.integers(0, k)] *= 30.0  # an outlier column, as LLM activations have
                assert nat.bcq_set_tables("int8") == "int8"
                y8 = run_uniform(x, planes01, s, mu, k=k, group=group)
                np.testing.assert_array_equal(run_uniform(x, planes01, s, mu, k=k, group=group, threads=2), y8)
                nat.bcq_set_tables("float32")
                yf = run_uniform(x, planes01, s, mu, k=k, group=group)
                what = f"int8 tables q={q} G={group} N={n} K={k} M={m}"
                if not t8_fits(q, group):
                    np.testing.assert_array_equal(y8, yf, err_msg=what)
                    continue
                assert (y8 != yf).any(), f"{what}: identical to float32 tables (int8 path not taken?)"
                ref, bound = uniform_ref(x, planes01, s, mu, k, group)
                err = np.abs(y8.astype(np.float64) - ref)
                allowed = t8_bound(x, s, q, k, group) * (1 + 1e-5) + RTOL * bound + 1e-30
                assert (err <= allowed).all(), f"{what}: worst err/allowed {np.max(err / allowed):.3g}"


X8_OUT = nat.BCQ_X8_OUTLIERS  # outliers per row and group of the int8 GEMM's X


def x8_round(x: np.ndarray, k: int, group: int):
    """X as the AVX2 int8 GEMM holds it (bcq_lut_avx2.inc, prepare_x8_avx2). Per group, the X8_OUT
    columns of largest max |x| over the rows (> 0; the first of equals) are the outliers; per row
    and group r = the largest |x| of the other columns, at least the outliers' |x| / 256; scale
    d = r / 127 and every column, outliers included, as rint(x * (127 / r)) (float32 product, ties
    to even). Returns (x8 [M, NG, G] as float64, with the outliers' large values; d [M, NG])."""
    m = x.shape[0]
    ng = -(-k // group)
    xp = np.zeros((m, ng * group), np.float32)
    xp[:, :k] = x
    g3 = xp.reshape(m, ng, group)
    a = np.abs(g3)
    colmax = a.max(0)  # [NG, G]
    order = np.argsort(-colmax, axis=-1, kind="stable")[:, :X8_OUT]
    out = np.zeros(colmax.shape, bool)
    np.put_along_axis(out, order, np.take_along_axis(colmax, order, -1) > 0, -1)
    rest = np.maximum(np.where(out, 0, a).max(-1), np.where(out, a, 0).max(-1) * np.float32(1 / 256)).astype(np.float32)
    inv = np.where(rest > 0, np.float32(127) / np.where(rest > 0, rest, 1), 0).astype(np.float32)
    x8 = np.rint(g3 * inv[..., None]).astype(np.float64)
    assert np.all(np.abs(x8[:, ~out]) <= 127) and np.all(np.abs(x8) <= 127 * 256)
    return x8, (rest / np.float32(127)).astype(np.float64)


def x8_ref(x: np.ndarray, planes01: np.ndarray, s: np.ndarray, mu: np.ndarray, k: int, group: int):
    """The AVX2 int8 GEMM's arithmetic in float64 after its one rounding (x8_round):
    Y = sum_g s d (C x8) + mu sum_k x. Returns (Y, B) with B [M, N] bounding every intermediate
    (sum_g s d |C| |x8| + |mu| sum_k |x|) for the float rounding of the kernel's sums."""
    q = planes01.shape[0]
    x8, d = x8_round(x, k, group)
    m, ng = d.shape
    kp = ng * group
    xp = np.zeros((m, kp), np.float64)
    xp[:, :k] = x
    gsum, gabs = xp.reshape(m, ng, group).sum(-1), np.abs(xp).reshape(m, ng, group).sum(-1)
    code = np.zeros((planes01.shape[1], kp))
    code[:, :k] = sum(planes01[i].astype(np.float64) * 2.0**i for i in range(q))
    c3 = code.reshape(-1, ng, group)
    sd = s.astype(np.float64)[None] * d[:, None, :]  # [M, N, NG]
    mu64 = mu.astype(np.float64)
    y = (np.einsum("mgk,ngk->mng", x8, c3) * sd).sum(-1) + gsum @ mu64.T
    bound = (np.einsum("mgk,ngk->mng", np.abs(x8), c3) * sd).sum(-1) + gabs @ np.abs(mu64).T
    return y, bound


@pytest.mark.parametrize("group", [32, 64, 128, 1024])
@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_uniform_int8_gemm(q, group):
    """The AVX2 GEMM of uniform weights on int8 X (the default there, `int8` mode): equal to
    x8_ref within float rounding (RTOL of its bound) for every M of the GEMM path (both workspace
    layouts: below and above MAX_M), partial blocks, tasks and groups (K = 100), more than one
    K-slice (K = 1536), 1 and 2 threads; different from the float32 mode wherever it runs, and
    equal to it bit for bit on the GEMM path where it does not (groups wider than the kernel's
    512-column panel)."""
    rng = np.random.default_rng(11 * q + group)
    with kernels_on("avx2"):
        for n, k in ((17, 576), (40, 100), (200, 1536)):
            planes01, s, mu = make_uniform(rng, q, n, k, group)
            for m in sorted({1, 2, 3, 4, 5, 6, 7, 8, MAX_M - 1, MAX_M, 16, 33, 130}):
                x = rng.standard_normal((m, k)).astype(np.float32)
                x[:, rng.integers(0, k, 3)] *= 30.0  # outlier columns (some groups: more than X8_OUT)
                x[0, : min(k, group)] = 0.0  # an all-zero group (scale 0)
                if k >= 2 * group:  # a group of zeros, but for one column: an outlier, nothing else
                    x[:, group : 2 * group] = 0.0
                    x[m // 2, group + 3] = 5.0
                x[:, -min(k, 8):] = 1.5  # equal magnitudes: the first are the outliers
                nat.bcq_set_tables("float32")
                yf = run_uniform(x, planes01, s, mu, k=k, group=group)
                assert nat.bcq_set_tables("int8") == "int8"
                y8 = run_uniform(x, planes01, s, mu, k=k, group=group)
                np.testing.assert_array_equal(run_uniform(x, planes01, s, mu, k=k, group=group, threads=2), y8)
                what = f"int8 GEMM q={q} G={group} N={n} K={k} M={m}"
                if group > 512:  # the float GEMM in both modes (the tables below MAX_M: int8 where t8_fits)
                    if m >= MAX_M:
                        np.testing.assert_array_equal(y8, yf, err_msg=what)
                    continue
                if m < GEMM_FROM_M[q]:  # the table path (int8 tables: test_uniform_int8_tables)
                    continue
                assert (y8 != yf).any(), f"{what}: identical to the float32 GEMM (int8 path not taken?)"
                ref, bound = x8_ref(x, planes01, s, mu, k, group)
                err = np.abs(y8.astype(np.float64) - ref)
                bad = err > RTOL * bound + 1e-30
                assert not bad.any(), f"{what}: {bad.sum()} outputs off, worst err/bound {np.max(err / np.maximum(bound, 1e-30)):.3g}"


def test_set_tables_rejects_unknown():
    with pytest.raises(ValueError, match="bcq_set_tables: name must be"):
        nat.bcq_set_tables("int4")
    assert nat.bcq_tables() in ("int8", "float32")


@pytest.mark.parametrize("q,n,k,group", [(1, 1, 64, 32), (3, 17, 576, 128), (4, 40, 100, 64), (2, 33, 33, 32)])
def test_pack_codes_equals_lut16_codes(q, n, k, group):
    rng = np.random.default_rng(n)
    planes = pack_planes(rng.integers(0, 2, (q, n, k), dtype=np.uint8))
    alpha = np.ones((q, n, -(-k // group)), np.float32)
    codes = nat.bcq_pack_codes(planes, k, group)
    assert codes.dtype == np.uint8
    np.testing.assert_array_equal(codes, nat.bcq_pack_lut16(planes, alpha, k, group)[0])


def np_pack_uniform(s: np.ndarray, mu: np.ndarray, group: int) -> np.ndarray:
    """numpy transcription of su [NB][NG][2][16] in shiftc/bcq_lut.h."""
    n, ng = s.shape
    nb = -(-n // 16)
    su = np.zeros((2, nb * 16, ng), np.uint16)
    su[0, :n], su[1, :n] = s.view(np.uint16), mu.view(np.uint16)
    return su.reshape(2, nb, 16, ng).transpose(1, 3, 0, 2).ravel()


@pytest.mark.parametrize("n,k,group", [(1, 64, 32), (17, 576, 128), (40, 100, 64), (33, 33, 32)])
def test_pack_uniform_layout(n, k, group):
    rng = np.random.default_rng(n)
    _, s, mu = make_uniform(rng, 1, n, k, group)
    su = nat.bcq_pack_uniform(s, mu, k, group)
    assert su.dtype == np.uint16
    np.testing.assert_array_equal(su, np_pack_uniform(s, mu, group))
    # non-contiguous inputs are read by value
    np.testing.assert_array_equal(nat.bcq_pack_uniform(np.asfortranarray(s), mu[:, ::1], k, group), su)


def test_uniform_pack_rejects_bad_arguments():
    planes = np.zeros((2, 4, 3), np.uint32)  # K in 65..96
    with pytest.raises(ValueError, match="bcq_pack_codes: planes must have shape"):
        nat.bcq_pack_codes(planes, 200, 32)
    with pytest.raises(ValueError, match="bcq_pack_codes: group must be"):
        nat.bcq_pack_codes(planes, 96, 40)
    with pytest.raises(ValueError, match="bcq_pack_codes: planes must hold 1..4"):
        nat.bcq_pack_codes(np.zeros((5, 4, 3), np.uint32), 96, 32)
    with pytest.raises(ValueError, match="bcq_pack_codes: K must be >= 1"):
        nat.bcq_pack_codes(planes, 0, 32)
    s = np.ones((4, 3), np.float16)  # K in 65..96, G = 32
    with pytest.raises(ValueError, match="bcq_pack_uniform: s must be float16"):
        nat.bcq_pack_uniform(s.astype(np.float32), s, 96, 32)
    with pytest.raises(ValueError, match="bcq_pack_uniform: mu must be float16"):
        nat.bcq_pack_uniform(s, s.view(np.uint16), 96, 32)
    with pytest.raises(ValueError, match="bcq_pack_uniform: s must have shape"):
        nat.bcq_pack_uniform(s, s, 96, 64)
    with pytest.raises(ValueError, match="bcq_pack_uniform: mu must have the shape of s"):
        nat.bcq_pack_uniform(s, s[:3], 96, 32)
    with pytest.raises(ValueError, match="bcq_pack_uniform: s must be 2-D"):
        nat.bcq_pack_uniform(s.ravel(), s, 96, 32)
    with pytest.raises(ValueError, match="bcq_pack_uniform: group must be"):
        nat.bcq_pack_uniform(s, s, 96, 48)


@pytest.fixture(scope="module")
def packed_uniform():
    rng = np.random.default_rng(0)
    q, n, k, group = 3, 20, 96, 32
    planes01, s, mu = make_uniform(rng, q, n, k, group)
    codes = nat.bcq_pack_codes(pack_planes(planes01), k, group)
    su = nat.bcq_pack_uniform(s, mu, k, group)
    x = rng.standard_normal((3, k)).astype(np.float32)
    return dict(x=x, codes=codes, su=su, N=n, K=k, q=q, group=group)


@pytest.mark.parametrize("change,match", [
    (dict(x=np.zeros((3, 95), np.float32)), "x must have shape"),
    (dict(x=np.zeros(96, np.float32)), "x must be 2-D"),
    (dict(codes="int8"), "codes must be uint8"),
    (dict(codes="short"), "codes must hold"),
    (dict(su="float16"), "su must be uint16"),
    (dict(su="short"), "su must hold"),
    (dict(N=0), "N must be >= 1"),
    (dict(N=40), "codes must hold"),
    (dict(K=0), "K must be >= 1"),
    (dict(q=0), "q must be in 1..4"),
    (dict(q=5), "q must be in 1..4"),
    (dict(q=2), "codes must hold"),
    (dict(group=48), "group must be a positive multiple of 32"),
    (dict(threads=0), "threads must be >= 1"),
])
def test_matmul_uniform_rejects_bad_arguments(packed_uniform, change, match):
    args = dict(packed_uniform, threads=1)
    for key, val in change.items():
        if isinstance(val, str) and val == "short":
            val = args[key][:-1]
        elif isinstance(val, str):
            val = args[key].view(val) if np.dtype(val).itemsize == args[key].itemsize else args[key].astype(val)
        args[key] = val
    with pytest.raises(ValueError, match=f"bcq_matmul_uniform: {match}"):
        nat.bcq_matmul_uniform(**args)
