"""Tests for shiftc._native: packed bit-plane format helpers and the scalar BCQ
reference kernels, checked against plain numpy.

The layout under test is documented in csrc/include/shiftc/packed.h.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shiftc import _native as nat

# Tolerances. The reference kernels accumulate in float64 and round once to
# float32, so the relative error is ~float32 epsilon; the absolute term covers
# outputs near zero and grows with the reduction length K (x ~ N(0, 1),
# |alpha| <= 1 in these tests).
RTOL_F32 = 1e-5
ATOL_PER_K = 1e-6  # atol = ATOL_PER_K * K * q


def atol_for(K: int, q: int = 1) -> float:
    return max(ATOL_PER_K * K * q, 1e-6)


# Shapes for the pack/unpack tests: (rows, cols), cols deliberately not always a
# multiple of 32, plus empty edge cases.
PACK_SHAPES = [
    (1, 1),
    (1, 31),
    (1, 32),
    (1, 33),
    (3, 64),
    (5, 70),
    (7, 100),
    (16, 127),
    (2, 128),
    (9, 257),
    (4, 1000),
    (0, 40),
    (3, 0),
]

GROUPS = [32, 64, 128]
CODINGS = ["pm1", "01"]
QS = [1, 2, 3, 4]


# ----------------------------------------------------------------------------
# numpy references
# ----------------------------------------------------------------------------
def np_pack(bits: np.ndarray) -> np.ndarray:
    """Explicit numpy packing: pad cols to a multiple of 32 with zeros, pack LSB
    first (bitorder='little'), view each 4 bytes as a little-endian uint32."""
    rows, cols = bits.shape
    wpr = (cols + 31) // 32
    padded = np.zeros((rows, wpr * 32), dtype=np.uint8)
    padded[:, :cols] = bits
    by = np.packbits(padded, axis=1, bitorder="little")  # [rows, wpr*4] uint8
    return np.ascontiguousarray(by).view("<u4").astype(np.uint32).reshape(rows, wpr)


def np_unpack(packed: np.ndarray, cols: int) -> np.ndarray:
    rows, wpr = packed.shape
    by = np.ascontiguousarray(packed.astype("<u4")).view(np.uint8).reshape(rows, wpr * 4)
    return np.unpackbits(by, axis=1, bitorder="little")[:, :cols]


def dense_weight(bits: np.ndarray, alpha: np.ndarray, group: int, coding: str) -> np.ndarray:
    """W [N, K] = sum_i alpha_i (broadcast over groups) * s(B_i), in float64.

    bits: uint8 [q, N, K]; alpha: [q, N, ceil(K/group)].
    """
    q, N, K = bits.shape
    s = bits.astype(np.float64)
    if coding == "pm1":
        s = 2.0 * s - 1.0
    a = np.repeat(alpha.astype(np.float64), group, axis=2)[:, :, :K]
    return (a * s).sum(axis=0)


def random_bcq(rng, q, N, K, group, float_scales=True):
    bits = rng.integers(0, 2, size=(q, N, K), dtype=np.uint8)
    planes = np.stack([nat.pack_bits(bits[i]) for i in range(q)]) if q else None
    ng = -(-K // group)
    if float_scales:
        alpha = rng.uniform(-1.0, 1.0, size=(q, N, ng)).astype(np.float32)
    else:
        e = rng.integers(-6, 1, size=(q, N, ng), dtype=np.int8)
        alpha = nat.exp2_scales(e)
    return bits, planes, alpha


# ----------------------------------------------------------------------------
# pack / unpack
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols", PACK_SHAPES)
def test_pack_unpack_roundtrip(rows, cols):
    rng = np.random.default_rng(rows * 1000 + cols)
    bits = rng.integers(0, 2, size=(rows, cols), dtype=np.uint8)
    packed = nat.pack_bits(bits)
    assert packed.dtype == np.uint32
    assert packed.shape == (rows, (cols + 31) // 32)
    out = nat.unpack_bits(packed, cols)
    assert out.dtype == np.uint8
    assert out.shape == (rows, cols)
    np.testing.assert_array_equal(out, bits)


@pytest.mark.parametrize("rows,cols", PACK_SHAPES)
def test_pack_bit_order_matches_numpy_packbits(rows, cols):
    rng = np.random.default_rng(7 + rows * 31 + cols)
    bits = rng.integers(0, 2, size=(rows, cols), dtype=np.uint8)
    np.testing.assert_array_equal(nat.pack_bits(bits), np_pack(bits))
    np.testing.assert_array_equal(nat.unpack_bits(np_pack(bits), cols), np_unpack(np_pack(bits), cols))
    np.testing.assert_array_equal(np_unpack(nat.pack_bits(bits), cols), bits)


@pytest.mark.parametrize("c", [0, 1, 5, 31, 32, 33, 63, 64, 95])
def test_single_bit_position(c):
    cols = 96
    bits = np.zeros((2, cols), dtype=np.uint8)
    bits[1, c] = 1
    packed = nat.pack_bits(bits)
    expect = np.zeros((2, 3), dtype=np.uint32)
    expect[1, c // 32] = np.uint32(1) << np.uint32(c % 32)
    np.testing.assert_array_equal(packed, expect)


@pytest.mark.parametrize("cols", [1, 17, 31, 33, 70])
def test_padding_bits_are_zero_and_ignored(cols):
    bits = np.ones((3, cols), dtype=np.uint8)
    packed = nat.pack_bits(bits)
    r = cols % 32
    if r:
        pad_mask = np.uint32(0xFFFFFFFF) << np.uint32(r)
        assert not np.any(packed[:, -1] & pad_mask)
    # garbage in padding bits must not leak into unpack
    dirty = packed.copy()
    dirty[:, -1] = np.uint32(0xFFFFFFFF)
    np.testing.assert_array_equal(nat.unpack_bits(dirty, cols), bits)


def test_pack_accepts_bool_and_noncontiguous():
    rng = np.random.default_rng(3)
    b = rng.integers(0, 2, size=(40, 24)).astype(bool)
    bt = b.T  # non-contiguous view [24, 40]
    np.testing.assert_array_equal(nat.pack_bits(bt), np_pack(bt.astype(np.uint8)))


def test_pack_rejects_non_binary_values():
    with pytest.raises(ValueError, match="bits"):
        nat.pack_bits(np.array([[0, 1, 2]], dtype=np.uint8))
    # a +-1 int8 array would silently become {255, 1}; it must be rejected
    with pytest.raises(ValueError, match="bits"):
        nat.pack_bits(np.array([[-1, 1, 1]], dtype=np.int8))
    with pytest.raises(ValueError, match="bits"):
        nat.pack_bits(np.zeros((2, 3), dtype=np.float32))


def test_unpack_accepts_int32_view():
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2, size=(4, 77), dtype=np.uint8)
    packed = nat.pack_bits(bits)
    np.testing.assert_array_equal(nat.unpack_bits(packed.view(np.int32), 77), bits)


# ----------------------------------------------------------------------------
# exponent scales
# ----------------------------------------------------------------------------
def test_exp2_scales_full_int8_range_exact():
    e = np.arange(-128, 128, dtype=np.int8)
    got = nat.exp2_scales(e)
    assert got.dtype == np.float32 and got.shape == e.shape
    expect = np.ldexp(np.float32(1.0), e.astype(np.int32)).astype(np.float32)
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(got.astype(np.float64), 2.0 ** e.astype(np.float64))


def test_exp2_scales_keeps_shape():
    e = np.arange(-12, 12, dtype=np.int8).reshape(2, 3, 4)
    got = nat.exp2_scales(e)
    assert got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, (2.0 ** e.astype(np.float64)).astype(np.float32))


def test_exp2_scales_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\be\b"):
        nat.exp2_scales(np.array([0, 200], dtype=np.int32))
    with pytest.raises(ValueError, match=r"\be\b"):
        nat.exp2_scales(np.array([0.5], dtype=np.float32))


# ----------------------------------------------------------------------------
# gemv / gemm vs numpy
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("K", [128, 200, 384])
def test_gemv_matches_numpy(q, group, coding, K):
    rng = np.random.default_rng([q, group, K, coding == "01"])
    N = 37
    bits, planes, alpha = random_bcq(rng, q, N, K, group)
    x = rng.standard_normal(K).astype(np.float32)
    y = nat.bcq_gemv_ref(x, planes, alpha, group, coding)
    assert y.dtype == np.float32 and y.shape == (N,)
    W = dense_weight(bits, alpha, group, coding)
    np.testing.assert_allclose(y, W @ x.astype(np.float64), rtol=RTOL_F32, atol=atol_for(K, q))


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("q", QS)
def test_gemm_matches_numpy(q, group, coding):
    rng = np.random.default_rng(1000 + q * 10 + group + (coding == "01"))
    M, N, K = 5, 23, 320
    bits, planes, alpha = random_bcq(rng, q, N, K, group, float_scales=False)
    X = rng.standard_normal((M, K)).astype(np.float32)
    Y = nat.bcq_gemm_ref(X, planes, alpha, group, coding)
    assert Y.dtype == np.float32 and Y.shape == (M, N)
    W = dense_weight(bits, alpha, group, coding)
    np.testing.assert_allclose(Y, X.astype(np.float64) @ W.T, rtol=RTOL_F32, atol=atol_for(K, q))
    # gemm rows are exactly gemv of each row
    for m in range(M):
        np.testing.assert_array_equal(Y[m], nat.bcq_gemv_ref(X[m], planes, alpha, group, coding))


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("K", [1, 31, 33, 70, 129])
def test_gemv_odd_K_ignores_padding_bits(coding, K):
    rng = np.random.default_rng(K)
    q, N, group = 2, 9, 64
    bits, planes, alpha = random_bcq(rng, q, N, K, group)
    x = rng.standard_normal(K).astype(np.float32)
    y = nat.bcq_gemv_ref(x, planes, alpha, group, coding)
    W = dense_weight(bits, alpha, group, coding)
    np.testing.assert_allclose(y, W @ x.astype(np.float64), rtol=RTOL_F32, atol=atol_for(K, q))
    r = K % 32
    if r:
        dirty = planes.copy()
        dirty[:, :, -1] |= np.uint32(0xFFFFFFFF) << np.uint32(r)
        np.testing.assert_array_equal(nat.bcq_gemv_ref(x, dirty, alpha, group, coding), y)


def test_gemv_pm1_known_values():
    # W = 0.5 * s(B_0) + 0.25 * s(B_1), one group, K = 3
    b0 = np.array([[1, 0, 1]], dtype=np.uint8)
    b1 = np.array([[1, 1, 0]], dtype=np.uint8)
    planes = np.stack([nat.pack_bits(b0), nat.pack_bits(b1)])
    alpha = np.array([[[0.5]], [[0.25]]], dtype=np.float32)
    x = np.array([1.0, 2.0, 4.0], dtype=np.float32)
    # pm1: 0.5*(1 - 2 + 4) + 0.25*(1 + 2 - 4) = 1.5 - 0.25
    np.testing.assert_allclose(nat.bcq_gemv_ref(x, planes, alpha, 32, "pm1"), [1.25], rtol=0)
    # 01:  0.5*(1 + 4) + 0.25*(1 + 2) = 2.5 + 0.75
    np.testing.assert_allclose(nat.bcq_gemv_ref(x, planes, alpha, 32, "01"), [3.25], rtol=0)


def test_gemv_forcecast_inputs():
    rng = np.random.default_rng(5)
    q, N, K, group = 3, 8, 96, 32
    bits, planes, alpha = random_bcq(rng, q, N, K, group)
    x = rng.standard_normal(K).astype(np.float32)
    y = nat.bcq_gemv_ref(x, planes, alpha, group, "pm1")
    y2 = nat.bcq_gemv_ref(x.astype(np.float64), planes.view(np.int32), alpha.astype(np.float64), group, "pm1")
    np.testing.assert_array_equal(y, y2)
    # non-contiguous X
    Xt = np.asfortranarray(rng.standard_normal((4, K)).astype(np.float32))
    np.testing.assert_array_equal(
        nat.bcq_gemm_ref(Xt, planes, alpha, group, "01"),
        nat.bcq_gemm_ref(np.ascontiguousarray(Xt), planes, alpha, group, "01"),
    )


def test_gemm_threads_release_gil():
    rng = np.random.default_rng(9)
    q, N, K, group, M = 2, 64, 512, 128, 8
    _, planes, alpha = random_bcq(rng, q, N, K, group)
    X = rng.standard_normal((M, K)).astype(np.float32)
    expect = nat.bcq_gemm_ref(X, planes, alpha, group, "pm1")
    results = [None] * 4

    def work(i):
        results[i] = nat.bcq_gemm_ref(X, planes, alpha, group, "pm1")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_array_equal(r, expect)


# ----------------------------------------------------------------------------
# argument validation: ValueError naming the argument
# ----------------------------------------------------------------------------
def _valid(q=2, N=4, K=96, group=32):
    rng = np.random.default_rng(0)
    _, planes, alpha = random_bcq(rng, q, N, K, group)
    x = rng.standard_normal(K).astype(np.float32)
    return x, planes, alpha


def test_bad_shapes_pack_unpack():
    with pytest.raises(ValueError, match=r"pack_bits: bits must be 2-D"):
        nat.pack_bits(np.zeros(10, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"pack_bits: bits must be 2-D"):
        nat.pack_bits(np.zeros((2, 3, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"unpack_bits: packed must have shape"):
        nat.unpack_bits(np.zeros((2, 3), dtype=np.uint32), 33)
    with pytest.raises(ValueError, match=r"unpack_bits: packed must be 2-D"):
        nat.unpack_bits(np.zeros(3, dtype=np.uint32), 96)
    with pytest.raises(ValueError, match=r"unpack_bits: cols"):
        nat.unpack_bits(np.zeros((2, 0), dtype=np.uint32), -1)
    with pytest.raises(ValueError, match=r"unpack_bits: packed must be a uint32"):
        nat.unpack_bits(np.zeros((2, 3), dtype=np.float32), 96)


def test_bad_args_gemv():
    x, planes, alpha = _valid()
    g = 32
    with pytest.raises(ValueError, match=r"bcq_gemv_ref: x must be 1-D"):
        nat.bcq_gemv_ref(x[None, :], planes, alpha, g)
    with pytest.raises(ValueError, match=r"bcq_gemv_ref: planes must have shape"):
        nat.bcq_gemv_ref(x[:-32], planes, alpha, g)  # K=64 -> 2 words, planes has 3
    with pytest.raises(ValueError, match=r"bcq_gemv_ref: planes must be 3-D"):
        nat.bcq_gemv_ref(x, planes[0], alpha, g)
    with pytest.raises(ValueError, match=r"bcq_gemv_ref: planes must hold at least one"):
        nat.bcq_gemv_ref(x, planes[:0], alpha[:0], g)
    with pytest.raises(ValueError, match=r"bcq_gemv_ref: scales must have shape"):
        nat.bcq_gemv_ref(x, planes, alpha, 64)  # 3 groups given, 2 expected
    with pytest.raises(ValueError, match=r"bcq_gemv_ref: scales must have shape"):
        nat.bcq_gemv_ref(x, planes, alpha[:1], g)  # q mismatch
    with pytest.raises(ValueError, match=r"bcq_gemv_ref: scales must have shape"):
        nat.bcq_gemv_ref(x, planes, alpha[:, :2], g)  # N mismatch
    with pytest.raises(ValueError, match=r"bcq_gemv_ref: scales must be 3-D"):
        nat.bcq_gemv_ref(x, planes, alpha[0], g)
    for bad in (0, -32, 48, 16):
        with pytest.raises(ValueError, match=r"bcq_gemv_ref: group must be a positive multiple of 32"):
            nat.bcq_gemv_ref(x, planes, alpha, bad)
    with pytest.raises(ValueError, match=r"bcq_gemv_ref: coding must be"):
        nat.bcq_gemv_ref(x, planes, alpha, g, "pm")
    with pytest.raises(ValueError, match=r"bcq_gemv_ref: x must be a float32"):
        nat.bcq_gemv_ref(x.astype(np.complex64), planes, alpha, g)
    with pytest.raises(ValueError, match=r"bcq_gemv_ref: planes must be a uint32"):
        nat.bcq_gemv_ref(x, planes.astype(np.float32), alpha, g)
    with pytest.raises(ValueError, match=r"bcq_gemv_ref: scales must be a float32"):
        nat.bcq_gemv_ref(x, planes, np.array([["a"]]), g)


def test_bad_args_gemm():
    x, planes, alpha = _valid()
    g = 32
    with pytest.raises(ValueError, match=r"bcq_gemm_ref: X must be 2-D"):
        nat.bcq_gemm_ref(x, planes, alpha, g)
    with pytest.raises(ValueError, match=r"bcq_gemm_ref: planes must have shape"):
        nat.bcq_gemm_ref(np.zeros((2, 200), np.float32), planes, alpha, g)
    with pytest.raises(ValueError, match=r"bcq_gemm_ref: scales must have shape"):
        nat.bcq_gemm_ref(x[None, :], planes, alpha[:, :, :2], g)
    with pytest.raises(ValueError, match=r"bcq_gemm_ref: coding must be"):
        nat.bcq_gemm_ref(x[None, :], planes, alpha, g, "pm1 ")


def test_empty_dims():
    _, planes, alpha = _valid(q=1, N=0, K=64)
    assert nat.bcq_gemv_ref(np.zeros(64, np.float32), planes, alpha, 32).shape == (0,)
    _, planes, alpha = _valid(q=2, N=3, K=64)
    assert nat.bcq_gemm_ref(np.zeros((0, 64), np.float32), planes, alpha, 32).shape == (0, 3)
