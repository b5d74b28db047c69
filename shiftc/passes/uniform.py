"""Uniform asymmetric quantization of a table's rows (math only; the QGather op's storage).

Each row is split into groups of G columns; a group holds a float16 ``scale`` and ``min`` and
codes ``c = clip(round((w − min) / scale), 0, 2^q − 1)`` computed against the rounded values, so
that ``Ŵ = scale·c + min`` is exactly what the op reconstructs. The grid starts at the group's
min/max and is refined by least squares on the codes (:func:`quantize`). Codes are packed 8/q per byte, low bits
first (q ∈ {2, 4, 8}). Stored bits per weight: q + 32/G.

Round-to-nearest on this grid is exact for weights that already sit on such a grid (the Q4_1 /
Q8_0-style GGUF checkpoints shiftc imports), and is the usual choice for embedding tables, which
see no calibration data that error compensation could use.
"""

from __future__ import annotations

import numpy as np

BITS = (2, 4, 8)


def bits_per_weight(bits: int, group: int) -> float:
    return bits + 32 / group


def quantize(w: np.ndarray, bits: int, group: int, iters: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [N, ceil(K·q/8)], scales float16 [N, ng], mins float16 [N, ng]) of W [N, K].

    Starts from the group's min/max grid, then alternates ``iters`` times: codes for the current
    (scale, min), least-squares (scale, min) for those codes (w ≈ s·c + m per group, closed form),
    both rounded to float16; each group keeps the pair with the lowest squared error."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group < 1:
        raise ValueError(f"group must be positive, got {group}")
    n, k = w.shape
    ng = -(-k // group)
    wp = np.zeros((n, ng * group), np.float32)
    wp[:, :k] = w
    wp[:, k:] = w[:, -1:] if k else 0  # padding repeats the last column: no effect on min/max
    g3 = wp.reshape(n, ng, group)
    levels = 2**bits - 1
    lo = g3.min(-1).astype(np.float16)
    scale = ((g3.max(-1) - lo.astype(np.float32)) / levels).astype(np.float16)

    def codes_for(scale, lo):
        s = scale.astype(np.float32)[..., None]
        c = np.clip(np.rint((g3 - lo.astype(np.float32)[..., None]) / np.where(s == 0, 1, s)), 0, levels)
        err = ((c * s + lo.astype(np.float32)[..., None] - g3) ** 2).sum(-1)
        return c, err

    best_c, best_err = codes_for(scale, lo)
    best_s, best_lo = scale, lo
    c = best_c
    for _ in range(iters):
        cm = c.mean(-1, keepdims=True)
        var = ((c - cm) ** 2).sum(-1)
        cov = ((c - cm) * (g3 - g3.mean(-1, keepdims=True))).sum(-1)
        s_new = np.where(var > 0, cov / np.where(var > 0, var, 1), best_s.astype(np.float32))
        s_new = np.maximum(s_new, 0).astype(np.float16)
        lo_new = (g3.mean(-1) - s_new.astype(np.float32) * cm[..., 0]).astype(np.float16)
        c, err = codes_for(s_new, lo_new)
        better = err < best_err
        best_c = np.where(better[..., None], c, best_c)
        best_s, best_lo = np.where(better, s_new, best_s), np.where(better, lo_new, best_lo)
        best_err = np.minimum(err, best_err)
    codes = best_c.reshape(n, ng * group)[:, :k].astype(np.uint8)
    return pack(codes, bits), best_s.astype(np.float16), best_lo.astype(np.float16)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [N, K] (< 2^q) -> [N, ceil(K·q/8)], code k at bits (k·q) % 8 of byte k·q/8."""
    per = 8 // bits
    n, k = codes.shape
    c = np.zeros((n, -(-k // per) * per), np.uint8)
    c[:, :k] = codes
    c = c.reshape(n, -1, per).astype(np.uint16) << (np.arange(per, dtype=np.uint16) * bits)
    return c.sum(-1).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    per = 8 // bits
    c = (packed[..., None].astype(np.uint16) >> (np.arange(per, dtype=np.uint16) * bits)) & (2**bits - 1)
    return c.reshape(*packed.shape[:-1], -1)[..., :k].astype(np.uint8)


def dequantize(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, bits: int, group: int, k: int) -> np.ndarray:
    """Ŵ [N, K] float32 = scale·c + min, per group (what QGather computes)."""
    c = unpack(codes, bits, k).astype(np.float32)
    s = np.repeat(scales.astype(np.float32), group, axis=-1)[..., :k]
    m = np.repeat(mins.astype(np.float32), group, axis=-1)[..., :k]
    return c * s + m
