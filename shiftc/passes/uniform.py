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

from dataclasses import dataclass

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


# -- uniform grids as bit planes (the shift-add pass's scale_mode "uniform") ----------------------
#
# A q-bit code c = Σ_i 2^i·b_i, b_i ∈ {0, 1}, on the grid Ŵ = scale·c + min is q binary planes whose
# scales are the group scale times 2^i — a shift apart — plus an offset:
#
#     Ŵ[n, k] = min[n, g] + Σ_{i<q} (2^i·scale[n, g])·B_i[n, k]
#
# ``ai.shiftc::UniformMatMul`` stores the planes (csrc/include/shiftc/packed.h) and one float16
# scale and min per row and group: q + 32/G bits per weight. The fit runs inside the GPTQ column
# loop (:func:`shiftc.passes.bcq.gptq`): a group's grid is fitted on its compensated weights when
# its first column is reached (:func:`fit_grid`), then each column is rounded to it.

CLIP_STEPS = 12  # range shrink factors tried per group, 1 down to CLIP_MIN
CLIP_MIN = 0.55


@dataclass
class UniformResult:
    """A matrix on a uniform grid: ``codes[n, k]`` ∈ [0, 2^q), bit i = plane i."""

    codes: np.ndarray  # uint8 [N, K]
    scales: np.ndarray  # float16 [N, ceil(K/G)]
    mins: np.ndarray  # float16 [N, ceil(K/G)]
    bits: int
    group: int
    scale_mode: str = "uniform"

    def planes01(self) -> np.ndarray:
        from .bcq import code_planes

        return code_planes(self.codes, self.bits)

    def packed_planes(self) -> np.ndarray:
        from .bcq import pack_planes

        return pack_planes(self.planes01())

    def dequantize(self) -> np.ndarray:
        return grid_weight(self.codes, self.scales, self.mins, self.group)


def grid_weight(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, group: int) -> np.ndarray:
    """Ŵ [N, K] float32 = scale·c + min per group (codes [N, K], one code per weight)."""
    k = codes.shape[1]
    s = np.repeat(scales.astype(np.float32), group, axis=-1)[:, :k]
    m = np.repeat(mins.astype(np.float32), group, axis=-1)[:, :k]
    return codes.astype(np.float32) * s + m


def fit_grid(w: np.ndarray, bits: int, col_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scale, min) float16 [N] of one group w [N, C] minimising Σ_c d_c (w_c − Ŵ_c)², d = col_weight
    (the activation energy diag(H) of the columns; None: 1).

    Candidates: the min/max range shrunk by factors 1 … CLIP_MIN about its centre, each followed by
    one weighted least-squares refit of (scale, min) for its codes; all rounded to float16 before
    they are scored, so the grid chosen is the best grid that is stored. Factor 1 reproduces a
    grid the weights already sit on (a 4-bit checkpoint re-quantized at 4 bits is exact)."""
    w = np.asarray(w, np.float32)
    d = np.ones(w.shape[1], np.float32) if col_weight is None else np.maximum(np.asarray(col_weight, np.float32), 0)
    d = d / max(float(d.sum()), 1e-30)
    levels = 2**bits - 1
    lo, hi = w.min(1), w.max(1)
    best_err = np.full(w.shape[0], np.inf, np.float32)
    best_s = np.zeros(w.shape[0], np.float16)
    best_m = lo.astype(np.float16)

    def score(s16, m16):
        s, m = s16.astype(np.float32)[:, None], m16.astype(np.float32)[:, None]
        c = np.clip(np.rint((w - m) / np.where(s > 0, s, 1)), 0, levels)
        return c, (((c * s + m - w) ** 2) * d).sum(1)

    for f in np.linspace(1.0, CLIP_MIN, CLIP_STEPS):
        s16 = ((hi - lo) * f / levels).astype(np.float16)
        m16 = (lo + (hi - lo) * (1 - f) / 2).astype(np.float16)
        for refit in (False, True):
            if refit:  # weighted least squares on the candidate's codes: w ≈ s·c + m
                cm = (c * d).sum(1, keepdims=True)
                wm = (w * d).sum(1, keepdims=True)
                var = (((c - cm) ** 2) * d).sum(1)
                cov = ((c - cm) * (w - wm) * d).sum(1)
                s = np.where(var > 0, cov / np.where(var > 0, var, 1), s16.astype(np.float32))
                s16 = np.maximum(s, 0).astype(np.float16)
                m16 = (wm[:, 0] - s16.astype(np.float32) * cm[:, 0]).astype(np.float16)
            c, err = score(s16, m16)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s, best_m = np.where(better, s16, best_s), np.where(better, m16, best_m)
    return best_s, best_m


def quantize_grid_gptq(w: np.ndarray, h: np.ndarray | None, bits: int, group: int, *, damp: float = 0.01,
                       act_order: bool = True) -> UniformResult:
    """W [N, K] on a q-bit uniform grid per group of G columns, inside GPTQ error compensation with
    H = XᵀX of the layer's inputs (None: each group rounded as it is)."""
    from .bcq import WORD_BITS, gptq

    if not 1 <= bits <= 4:
        raise ValueError(f"bits must be in 1..4, got {bits}")
    if group < WORD_BITS or group % WORD_BITS:
        raise ValueError(f"group must be a positive multiple of {WORD_BITS}, got {group}")
    n, k = np.shape(w)
    ng = -(-k // group)
    levels = 2**bits - 1
    scales = np.zeros((n, ng), np.float16)
    mins = np.zeros((n, ng), np.float16)
    grids: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def fit(g, cur, col_weight):
        cw = None if col_weight is None else col_weight.numpy()
        scales[:, g], mins[:, g] = fit_grid(cur.numpy(), bits, cw)
        s = scales[:, g].astype(np.float32)[:, None]
        grids[g] = (s, np.where(s > 0, s, 1), mins[:, g].astype(np.float32)[:, None])

    def nearest(g, col):
        s, s_div, m = grids[g]
        c = np.clip(np.rint((col - m) / s_div), 0, levels)
        return c.astype(np.uint8), c * s + m

    codes = gptq(w, h, group, fit, nearest, damp=damp, act_order=act_order).numpy()
    return UniformResult(codes, scales, mins, bits, group)
