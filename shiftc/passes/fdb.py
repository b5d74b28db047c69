"""Flexible Dual Binarization (FDB): {0,1} bit planes with free float scales and a per-group offset.

Math only (numpy in, numpy out; torch does the work on the CPU); the graph pass is
shiftc/passes/binarize.py and the op it writes is ``ai.shiftc::FdbMatMul`` (shiftc/passes/ops/).

Representation
--------------
A weight matrix ``W [N, K]`` (N output rows, K input columns) is approximated per row n and group g
of G consecutive columns by

    ŵ = Σ_{i<q} α_i · b_i + μ,        b_i ∈ {0, 1},   α_i, μ float16 (any sign)

``fdb`` (q = 2): ŵ = α1·b1 + α2·b2 + μ, four levels per group. With α1 = 2s, α2 = s, μ = m the four
levels are the 2-bit uniform asymmetric grid s·(2b1 + b2) + m, which is where the fit starts; the
two scales then move independently, so the levels need not be evenly spaced (DB-LLM, "flexible
dual binarization": two binary planes whose scales are fitted rather than tied to a grid).

``1bit`` (q = 1): ŵ = α·s(b) + μ with s(b) = 2b − 1 ∈ {−1, +1}: one sign plane, a per-group scale
and a per-group mean. It is stored in the same {0,1} form: 2α·b + (μ − α).

Storage: q bits per weight plus q scales and one offset, float16, per row and group:
    bits per weight = q + 16 (q + 1) / G          (fdb G=128: 2.375; 1bit G=128: 1.25)

Fit of one group (:func:`fit_group`), rows independent, column j weighted by c_j ≥ 0 (GPTQ passes
diag H, the input activation energy of the column):
  1. init: fdb from the group's min/max (the uniform grid above); 1bit from the weighted mean μ0
     and mean absolute deviation a: levels μ0 ± a;
  2. ``iters`` rounds of: codes ← per weight the nearest of the 2^q levels; (α, μ) ← weighted
     least squares  min Σ_j c_j (w_j − Σ_i α_i b_ij − μ)²  (a (q+1)×(q+1) system per row, with a
     tiny ridge: a plane that is constant over the group is collinear with μ); α, μ rounded to
     float16 inside the loop; the best (α, μ) seen, by weighted error, is kept per row.

Output-error-aware fit (:func:`quantize_gptq`): the same GPTQ column-wise compensation as
shiftc/passes/bcq.py (H = XᵀX damped by ``damp``·mean(diag H), dead columns zeroed, optional
activation order, upper Cholesky factor U of H⁻¹, lazy block updates): a group is fitted on its
current (compensated) weights when its first column is reached; each column then takes the nearest
level per row and its error (w_j − ŵ_j)/U_jj is propagated to the columns not yet quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import bcq
from .bcq import WORD_BITS, code_planes, pack_planes

MODES = {"fdb": 2, "1bit": 1}  # mode -> planes (q)
FP16_MAX = 65504.0


@dataclass
class FdbResult:
    """A binarized matrix. ``codes[n, k]``: bit i set ⟺ b_i[n, k] = 1."""

    codes: np.ndarray  # uint8 [N, K]
    scales: np.ndarray  # float16 [q, N, ceil(K/G)]
    offsets: np.ndarray  # float16 [N, ceil(K/G)]
    bits: int
    group: int
    mode: str

    def planes01(self) -> np.ndarray:
        """uint8 [q, N, K] of 0/1: plane i holds bit i of the codes."""
        return code_planes(self.codes, self.bits)

    def packed_planes(self) -> np.ndarray:
        """uint32 [q, N, ceil(K/32)] (layout of csrc/include/shiftc/packed.h)."""
        return pack_planes(self.planes01())

    def dequantize(self) -> np.ndarray:
        return reconstruct(self.planes01(), self.scales, self.offsets, self.group)


def reconstruct(planes01: np.ndarray, scales: np.ndarray, offsets: np.ndarray, group: int) -> np.ndarray:
    """Ŵ [N, K] float32 = Σ_i α_i b_i + μ, α [q, N, ng] and μ [N, ng] broadcast over each group."""
    q, n, k = planes01.shape
    a = np.repeat(scales.astype(np.float32), group, axis=-1)[..., :k]
    mu = np.repeat(offsets.astype(np.float32), group, axis=-1)[..., :k]
    return (a * planes01.astype(np.float32)).sum(axis=0) + mu


def bits_per_weight(bits: int, group: int) -> float:
    """Stored bits per weight: q planes + (q scales + 1 offset) float16 per group."""
    return bits + 16 * (bits + 1) / group


def _check(mode: str, group: int) -> int:
    if mode not in MODES:
        raise ValueError(f"binarize mode must be one of {sorted(MODES)}, got {mode!r}")
    if group < WORD_BITS or group % WORD_BITS:
        raise ValueError(f"group must be a positive multiple of {WORD_BITS}, got {group}")
    return MODES[mode]


# -- fit of one group -----------------------------------------------------------------------------


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the float16 grid the model stores (kept as float32)."""
    return torch.nan_to_num(x, nan=0.0).clamp(-FP16_MAX, FP16_MAX).half().float()


def _code_bits(q: int) -> torch.Tensor:
    """[2^q, q] of 0/1: row c, column i = bit i of c."""
    c = torch.arange(2**q)
    return ((c[:, None] >> torch.arange(q)[None, :]) & 1).float()


def levels(alpha: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """α [q, N], μ [N] -> the 2^q code values [N, 2^q] (code c: Σ_i α_i·bit_i(c) + μ)."""
    return alpha.T @ _code_bits(alpha.shape[0]).T + mu[:, None]


def _book(alpha: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted levels [N, L], midpoints [N, L − 1], code of each sorted level [N, L])."""
    sv, order = torch.sort(levels(alpha, mu), dim=1)  # [N, L] ascending levels
    return sv, ((sv[:, 1:] + sv[:, :-1]) * 0.5).contiguous(), order


def nearest(w: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, C] -> (codes int64 [N, C], values [N, C]): per weight the nearest of the row's levels."""
    sv, mids, order = _book(alpha, mu)
    pos = (w > mids[:, :1]).long()  # index among the sorted levels: midpoints below w (2^q − 1 compares)
    for j in range(1, mids.shape[1]):
        pos += w > mids[:, j:j + 1]
    return order.gather(1, pos), sv.gather(1, pos)


def _err(w: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
    return ((w - nearest(w, alpha, mu)[1]) ** 2 * cw).sum(1)


def _init(w: torch.Tensor, q: int, cw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if q == 1:
        mu0 = (w * cw).sum(1) / cw.sum()
        a = ((w - mu0[:, None]).abs() * cw).sum(1) / cw.sum()
        return (2 * a)[None], mu0 - a
    mn, mx = w.min(1).values, w.max(1).values
    s = (mx - mn) / (2**q - 1)
    alpha = torch.stack([s * 2 ** (q - 1 - i) for i in range(q)])  # plane 0 carries the largest step
    return alpha, mn


def fit_group(w: torch.Tensor, bits: int, iters: int = 8,
              col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FDB fit of w [N, C] (one group, rows independent) -> (α [q, N], μ [N]) on the float16 grid."""
    n, c = w.shape
    cw = torch.ones(c) if col_weight is None else (col_weight / col_weight.mean().clamp_min(1e-30)).float()
    alpha, mu = _init(w, bits, cw)
    alpha, mu = _fp16(alpha), _fp16(mu)
    best_a, best_m, best_e = alpha.clone(), mu.clone(), _err(w, alpha, mu, cw)
    cb = _code_bits(bits)
    ridge = 1e-6 * float(cw.sum()) * torch.eye(bits + 1)
    for _ in range(iters):
        codes = nearest(w, alpha, mu)[0]
        A = torch.cat([cb[codes], torch.ones(n, c, 1)], -1)  # [N, C, q+1]
        Aw = A * cw[None, :, None]
        theta = torch.linalg.solve(Aw.transpose(1, 2) @ A + ridge, Aw.transpose(1, 2) @ w[:, :, None])[..., 0]
        alpha, mu = _fp16(theta[:, :bits].T), _fp16(theta[:, bits])
        e = _err(w, alpha, mu, cw)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_a[:, better] = alpha[:, better]
        best_m[better] = mu[better]
        alpha, mu = best_a.clone(), best_m.clone()  # next round starts from the best so far
    return best_a, best_m


# -- whole matrices -------------------------------------------------------------------------------


def quantize_gptq(w: np.ndarray, h: np.ndarray | None, mode: str = "fdb", group: int = 128, *, damp: float = 0.01,
                  act_order: bool = False, iters: int = 8, block: int | None = None) -> FdbResult:
    """FDB of W [N, K] inside GPTQ error compensation with H [K, K] = XᵀX (see the module doc): the
    column loop is shift-add's (:func:`shiftc.passes.bcq.gptq`) with FDB's group fit and grid.

    ``h=None``: no calibration data, a plain group-by-group fit (no error propagation)."""
    q = _check(mode, group)
    n, k = np.shape(w)
    ng = -(-k // group)
    alpha = torch.zeros(q, n, ng)
    mu = torch.zeros(n, ng)

    books: dict[int, tuple] = {}

    def fit(g, cur, col_weight):
        alpha[:, :, g], mu[:, g] = fit_group(cur, q, iters, col_weight=col_weight)
        books[g] = bcq._np_book(_book(alpha[:, :, g], mu[:, g]))  # the group's grid, once (as nearest)

    codes = bcq.gptq(w, h, group, fit, lambda g, col: bcq._np_lookup(books[g], col), damp=damp,
                     act_order=act_order, block=block)
    return _result(codes, alpha, mu, q, group, mode)


def quantize(w: np.ndarray, mode: str = "fdb", group: int = 128, iters: int = 8) -> FdbResult:
    """Plain FDB of W [N, K] (weight error only)."""
    return quantize_gptq(w, None, mode, group, iters=iters)


def _result(codes, alpha, mu, q, group, mode) -> FdbResult:
    return FdbResult(codes.numpy(), alpha.numpy().astype(np.float16), mu.numpy().astype(np.float16), q, group, mode)
