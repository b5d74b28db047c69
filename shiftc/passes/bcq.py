"""Binary-coding quantization (BCQ) with power-of-two scales, inside GPTQ error compensation.

Math only (numpy in, numpy out; torch does the heavy lifting on the CPU); no graph here.

Representation
--------------
A weight matrix ``W [N, K]`` (N output rows, K input columns) is approximated by q binary planes

    W ≈ Ŵ = Σ_{i=1..q} α_i ⊙ B_i,     B_i ∈ {−1,+1}^{N×K},  α_i ∈ R_{>0}^{N × ceil(K/G)}

with one scale per (plane i, row n, group g of G consecutive columns), broadcast over the group.
Scales are rounded so that multiplying by α is a shift:

    scale_mode "pow2"    α = 2^e                 (one int8 exponent per scale)
    scale_mode "pow2x2"  α = 2^e1 + 2^e2         (two int8 exponents; e2 may be "no term")

Exponents are int8 in [−127, 127]; :data:`NO_TERM` (−128) means "this term is 0". Signs live in B,
so α > 0 (an all-zero group gets α = 0: every exponent is NO_TERM).

Fit of one group (:func:`fit_group`), rows independent, ``w ∈ R^G`` one row of the group:
  1. greedy init: r = w; for i = 1..q: b_i = sign(r) (sign 0 = +1), α_i = mean|r|, r -= α_i b_i;
  2. alternating refinement, ``iters`` rounds:
     α ← argmin_α ‖w − Bα‖² = (BᵀB)⁻¹ Bᵀw  (B = [b_1 … b_q] ∈ {±1}^{G×q}), then |α|, then rounded;
     b ← for every weight the best of the 2^q codes c ∈ {±1}^q: argmin_c |w_j − Σ_i α_i c_i|,
  keeping the best (B, α) seen. The rounding is inside the loop, so the final fit is the best
  fit for the rounded scales, not a rounded best fit.

Output-error-aware fit (:func:`quantize_gptq`), GPTQ (Frantar et al. 2022) with BCQ groups.
With calibration inputs X [T, K] of the layer and H = XᵀX, the layer's output error is

    E(Ŵ) = ‖XWᵀ − XŴᵀ‖²_F = tr((W − Ŵ) H (W − Ŵ)ᵀ).

  * damping: H ← H + λ · mean(diag H) · I (λ = ``damp``, 0.01); dead columns (H_jj = 0) get
    H_jj = 1 and W[:, j] = 0;
  * optional activation order: columns are processed by decreasing H_jj (groups stay the stored
    groups of consecutive columns);
  * U = upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU). Quantizing column j to ŵ_j with the later
    columns free, the optimal update of the not-yet-quantized columns k > j is
        δ_j = (w_j − ŵ_j) / U_jj,     W[:, k] ← W[:, k] − δ_j · U_jk      (k > j);
  * the scales α of a group are fitted (step 1–2 above) on the group's *current* (compensated)
    weights when its first column is reached, the squared error of column j weighted by H_jj
    (least squares for α becomes (BᵀDB)α = BᵀDw, D = diag(H_jj)): with the "massive
    activations" of LLMs one input channel can carry 10³× the median energy, and its weights
    must be fitted best; then each column takes, per row, the nearest of
    the 2^q code values Σ_i α_i c_i, and its error is propagated as above;
  * updates are applied lazily, a block of columns at a time: W[:, i2:] −= Δ U[i1:i2, i2:].

Speed (the same numbers as the plain loops: every float operation is kept, only work whose
outcome is known is skipped, and it is checked bit for bit by tests/test_bcq.py):
  * the error of a candidate scale set needs only the code values, not the codes: per weight the
    number of code-book midpoints below it (numpy compares into uint8), then a gather; a plane's
    candidates are scored in one batch, and the one of lo/hi the plane already holds is not
    scored again (it cannot be a strict improvement);
  * a row leaves the refinement when its least-squares scales fall into the same rounding grid as
    in the round before, or the rounded scales repeat (fixed point or 2-cycle): later rounds would
    only revisit scores already seen;
  * scratch buffers are reused within a fit (fresh multi-MB arrays cost a page fault per 4 KiB);
  * the per-column GPTQ steps run in numpy on the block's columns stored as contiguous rows.

Round-to-nearest baseline (:func:`quantize_rtn`): uniform asymmetric q-bit per group,
scale s = (max − min)/(2^q − 1), zero point z = round(−min/s), ŵ = s·(clamp(round(w/s) + z) − z).

Storage (:func:`bits_per_weight`), column padding ignored:
    BCQ pow2: q + 8q/G     BCQ pow2x2: q + 16q/G     RTN: q + (32 + q)/G  (fp32 scale, q-bit zero)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Exponent value meaning "no term" (the term is 0). Valid exponents are −127 … 127.
NO_TERM = -128
E_MIN, E_MAX = -127, 127
SCALE_MODES = {"pow2": 1, "pow2x2": 2}  # mode -> exponents per scale (T)
MAX_BITS = 4
WORD_BITS = 32


@dataclass
class BcqResult:
    """A quantized matrix. ``codes[n, k]`` is the code c ∈ [0, 2^q): bit i of c set ⟺ B_i[n,k] = +1."""

    codes: np.ndarray  # uint8 [N, K]
    exps: np.ndarray  # int8 [q, N, ceil(K/G), T]
    bits: int
    group: int
    scale_mode: str

    @property
    def alpha(self) -> np.ndarray:
        """float32 [q, N, ceil(K/G)]: α = Σ_t 2^{e_t} (NO_TERM terms are 0)."""
        return exps_to_alpha(self.exps)

    def planes01(self) -> np.ndarray:
        """uint8 [q, N, K] of 0/1: plane i holds bit i of the codes (1 = +1)."""
        return code_planes(self.codes, self.bits)

    def packed_planes(self) -> np.ndarray:
        """uint32 [q, N, ceil(K/32)] in the layout of csrc/include/shiftc/packed.h."""
        return pack_planes(self.planes01())

    def dequantize(self) -> np.ndarray:
        """Ŵ [N, K] float32: :func:`reconstruct` of the planes, straight from the codes (α·(±1) is
        a select; the planes are summed in the same order from 0, so the same numbers)."""
        k, alpha = self.codes.shape[1], self.alpha
        out = np.zeros(self.codes.shape, np.float32)
        for i in range(self.bits):
            a = np.repeat(alpha[i], self.group, axis=-1)[:, :k]
            out += np.where((self.codes >> i) & 1, a, -a)
        return out


def _check(bits: int, group: int, scale_mode: str) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    if group < WORD_BITS or group % WORD_BITS:
        raise ValueError(f"group must be a positive multiple of {WORD_BITS}, got {group}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {sorted(SCALE_MODES)}, got {scale_mode!r}")


# -- packing and reconstruction -------------------------------------------------------------------


def pack_planes(planes01: np.ndarray) -> np.ndarray:
    """uint8 0/1 [q, N, K] -> uint32 [q, N, ceil(K/32)]: bit c%32 of word c//32, zero padding."""
    q, n, k = planes01.shape
    wpr = -(-k // WORD_BITS)
    padded = np.zeros((q, n, wpr * WORD_BITS), np.uint8)
    padded[..., :k] = planes01
    packed = np.packbits(padded, axis=-1, bitorder="little")  # [q, n, wpr*4] bytes
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32).reshape(q, n, wpr)


def unpack_planes(packed: np.ndarray, k: int) -> np.ndarray:
    """uint32 [q, N, W] -> uint8 0/1 [q, N, k] (padding bits dropped)."""
    b = np.ascontiguousarray(packed.astype("<u4")).view(np.uint8)
    return np.unpackbits(b, axis=-1, bitorder="little")[..., :k]


def code_planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [N, K] -> uint8 0/1 [q, N, K]: plane i holds bit i of each code."""
    return np.stack([(codes >> i) & 1 for i in range(bits)]).astype(np.uint8)


def planes_to_codes(packed: np.ndarray, k: int) -> np.ndarray:
    """uint32 planes [q, N, W] -> uint8 codes [N, k] (the inverse of :func:`code_planes` + packing)."""
    codes = np.zeros(packed.shape[1:2] + (k,), np.uint8)
    for i, pl in enumerate(unpack_planes(packed, k)):
        codes |= pl << i
    return codes


def exps_to_alpha(exps: np.ndarray) -> np.ndarray:
    """int8 [..., T] -> float32 [...]: Σ_t 2^{e_t}, a NO_TERM exponent contributing 0."""
    e = exps.astype(np.float64)
    terms = np.where(exps == NO_TERM, 0.0, np.exp2(e))
    return terms.sum(axis=-1).astype(np.float32)


def reconstruct(planes01: np.ndarray, alpha: np.ndarray, group: int, coding: str = "pm1") -> np.ndarray:
    """Ŵ [N, K] = Σ_i α_i ⊙ s(B_i), α [q, N, ceil(K/G)] broadcast over each group's columns."""
    q, n, k = planes01.shape
    s = planes01.astype(np.float32) * 2 - 1 if coding == "pm1" else planes01.astype(np.float32)
    a = np.repeat(alpha.astype(np.float32), group, axis=-1)[..., :k]
    return (a * s).sum(axis=0)


def bits_per_weight(bits: int, group: int, scale_mode: str = "pow2", method: str = "bcq") -> float:
    """Stored bits per weight, scales included (see the module docstring)."""
    if method == "rtn":
        return bits + (32 + bits) / group
    if scale_mode == "uniform":  # a float16 scale and min per group (shiftc/passes/uniform.py)
        return bits + 32 / group
    return bits + 8 * SCALE_MODES[scale_mode] * bits / group


# -- scale rounding -----------------------------------------------------------------------------


def _nearest_pow2_exp(x: torch.Tensor) -> torch.Tensor:
    """Exponent e of the power of two nearest to x > 0 (in linear distance)."""
    lo = torch.floor(torch.log2(x))
    up = torch.where(x - torch.exp2(lo) > torch.exp2(lo + 1) - x, lo + 1, lo)
    return up


def round_scales(alpha: torch.Tensor, scale_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Round α ≥ 0 to the nearest representable value; returns (rounded α, int exponents [..., T])."""
    a = alpha.clamp_min(0)
    zero = a <= 2.0 ** (E_MIN - 1)
    safe = torch.where(zero, torch.ones_like(a), a)
    if scale_mode == "pow2":
        e = _nearest_pow2_exp(safe).clamp(E_MIN, E_MAX)
        e = torch.where(zero, torch.full_like(e, NO_TERM), e)
        val = torch.where(zero, torch.zeros_like(a), torch.exp2(e))
        return val, e[..., None]
    # pow2x2: best of {2^e1 + 2^e2 (e2 nearest to the residual), 2^e1, 2^(e1+1)}, e1 = floor(log2 α)
    e1 = torch.floor(torch.log2(safe)).clamp(E_MIN, E_MAX)
    r = safe - torch.exp2(e1)
    e2 = _nearest_pow2_exp(torch.where(r > 0, r, torch.ones_like(r))).clamp(E_MIN, E_MAX)
    e2 = torch.minimum(e2, e1)
    cands_val = torch.stack([torch.exp2(e1) + torch.exp2(e2), torch.exp2(e1), torch.exp2((e1 + 1).clamp(max=E_MAX))], -1)
    best = (cands_val - safe[..., None]).abs().argmin(-1, keepdim=True)
    val = cands_val.gather(-1, best)[..., 0]
    no = torch.full_like(e1, NO_TERM)
    first = torch.where(best[..., 0] == 2, (e1 + 1).clamp(max=E_MAX), e1)
    second = torch.where(best[..., 0] == 0, e2, no)
    e = torch.stack([first, second], -1)
    e = torch.where(zero[..., None], torch.full_like(e, NO_TERM), e)
    val = torch.where(zero, torch.zeros_like(val), val)
    return val, e


# -- BCQ fit of one group -----------------------------------------------------------------------


def _code_signs(q: int, dtype=torch.float32) -> torch.Tensor:
    """[2^q, q] of ±1: row c, column i = +1 iff bit i of c is set."""
    c = torch.arange(2**q)
    return (((c[:, None] >> torch.arange(q)[None, :]) & 1) * 2 - 1).to(dtype)


_SIGNS = {q: _code_signs(q) for q in range(1, MAX_BITS + 1)}  # float32 [2^q, q]
_SIGNS_T = {q: s.T.contiguous() for q, s in _SIGNS.items()}  # [q, 2^q]


def _sorted_values(alpha: torch.Tensor) -> torch.Tensor:
    """α [..., q, N] float32 -> the rows' code values Σ_i α_i c_i sorted ascending [..., N, 2^q]."""
    values = alpha.transpose(-1, -2) @ _SIGNS_T[alpha.shape[-2]]
    return torch.sort(values, dim=-1).values


def _midpoints(sv: torch.Tensor) -> torch.Tensor:
    """[..., 2^q − 1]: the midpoints between neighbouring sorted values (nondecreasing: rounding is
    monotone)."""
    return (sv[..., 1:] + sv[..., :-1]) * 0.5


def _below(w: np.ndarray, mids: np.ndarray, pos: np.ndarray | None = None, b: np.ndarray | None = None) -> np.ndarray:
    """uint8 [..., C]: how many of the nondecreasing midpoints ``mids [..., M]`` lie strictly below
    each weight of ``w [..., C]`` (numpy broadcasting over the leading axes) — the weight's position
    among the sorted code values. One compare per midpoint: numpy's float32 compares into a reused
    bool buffer and uint8 counts are ~5x faster than torch's compares into int64 on these shapes.
    ``pos`` (uint8) and ``b`` (bool) of the broadcast shape: buffers to use instead of new arrays."""
    if pos is None:
        pos = np.greater(w, mids[..., 0:1]).view(np.uint8)
    else:
        np.greater(w, mids[..., 0:1], out=pos.view(np.bool_))
    if mids.shape[-1] > 1:
        b = np.empty(pos.shape, np.bool_) if b is None else b
        for i in range(1, mids.shape[-1]):
            np.greater(w, mids[..., i : i + 1], out=b)
            pos += b.view(np.uint8)
    return pos


def _np_ok(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in ts)


def codebook(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """α [q, N] -> the rows' sorted code values ``sv`` [N, 2^q], the midpoints between neighbours
    [N, 2^q − 1] and ``code`` [N, 2^q]: the code of each sorted position, the lowest code of a run
    of equal values standing for the whole run. Built once per group, used for every column."""
    q = alpha.shape[0]
    values = alpha.T @ _code_signs(q, alpha.dtype).T  # [N, 2^q]
    sv, order = torch.sort(values, dim=1, stable=True)  # equal values keep increasing code order
    mids = _midpoints(sv)
    if q > 1:  # runs of equal values -> the first (lowest code) of the run
        start = torch.arange(2**q).expand_as(sv).clone()
        start[:, 1:] = torch.where(sv[:, 1:] == sv[:, :-1], 0, start[:, 1:])
        order = order.gather(1, start.cummax(1).values)
    return sv, mids, order


def lookup(book, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int64 [N, C], values [N, C]) of w [N, C] in a :func:`codebook`: the position of w
    among the sorted values is the number of midpoints below it (one compare per midpoint: q ≤ 4
    gives ≤ 15, much faster than torch.searchsorted on these shapes)."""
    sv, mids, code = book
    if _np_ok(w, mids):
        pos = torch.from_numpy(_below(w.numpy(), mids.numpy())).long()
    else:  # autograd / other devices: the same count in torch
        pos = torch.zeros(w.shape, dtype=torch.int64, device=w.device)
        for i in range(mids.shape[1]):
            pos += mids[:, i : i + 1] < w
    return code.gather(1, pos), sv.gather(1, pos)


def nearest_codes(w: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, C], α [q, N] -> (codes int64 [N, C], values [N, C]): per weight the best of 2^q codes
    (of codes with equal values, the lowest)."""
    return lookup(codebook(alpha), w)


def scale_neighbours(alpha: torch.Tensor, scale_mode: str, with_pow2: bool = False) -> tuple[torch.Tensor, ...]:
    """The representable values just below and just above α ≥ 0 (both 0 where α is 0).

    pow2: 2^⌊log2 α⌋ and twice that. pow2x2: with e1 = ⌊log2 α⌋, r = α − 2^e1, f = ⌊log2 r⌋:
    2^e1 + 2^f and 2^e1 + 2^(f+1) (α itself when r = 0); ``with_pow2``: then also pow2's two
    (the same numbers as a second call with "pow2").
    """
    a = alpha.clamp_min(0)
    zero = a <= 2.0 ** (E_MIN - 1)
    safe = torch.where(zero, torch.ones_like(a), a)
    e1 = torch.floor(torch.log2(safe)).clamp(E_MIN, E_MAX - 1)
    z = torch.zeros_like(a)
    base, twice = torch.exp2(e1), torch.exp2(e1 + 1)
    if scale_mode == "pow2":
        return torch.where(zero, z, base), torch.where(zero, z, twice)
    r = safe - base
    f = torch.floor(torch.log2(torch.where(r > 0, r, torch.ones_like(r)))).clamp(E_MIN, E_MAX)
    f = torch.minimum(f, e1 - 1)
    lo = torch.where(r > 0, base + torch.exp2(f), base)
    hi = torch.where(r > 0, base + torch.exp2(f + 1), base)
    out = (torch.where(zero, z, lo), torch.where(zero, z, hi))
    return out + (torch.where(zero, z, base), torch.where(zero, z, twice)) if with_pow2 else out


class _Scratch:
    """Buffers reused by every error evaluation of a fit. A fresh array per step would cost about
    as much as the step: glibc hands freed blocks of this size back to the OS, and the next one is
    paid for again with a page fault (and zeroing) per 4 KiB."""

    def __init__(self, size: int, slots: int = 1, bits: int = 1):
        self.b, self.pos = np.empty(slots * size, np.bool_), np.empty(slots * size, np.uint8)
        self.idx = torch.empty(max(slots, 2) * size, dtype=torch.int64)
        self.v, self.bw = torch.empty(max(slots, bits) * size), torch.empty(bits * size)

    def views(self, shape: tuple[int, ...]):
        m = int(np.prod(shape))
        return self.b[:m].reshape(shape), self.pos[:m].reshape(shape), self.idx[:m].view(shape), self.v[:m].view(shape)


def _sq_err(w: torch.Tensor, alpha: torch.Tensor, cw: torch.Tensor | None = None,
            wn: np.ndarray | None = None, scratch: _Scratch | None = None) -> torch.Tensor:
    """Σ_j cw_j (w_j − ŵ_j)² per row, ŵ_j the nearest code value: w [N, C], α [..., q, N] (leading
    axes: several scale sets at once) -> [..., N]. The same numbers as through :func:`nearest_codes`
    (only the values are needed, so no code book). ``wn``: w as numpy."""
    sv = _sorted_values(alpha)
    b, pos, idx, v = (scratch or _Scratch(w.numel(), int(np.prod(alpha.shape[:-2])))).views((*alpha.shape[:-2], *w.shape))
    _below(w.numpy() if wn is None else wn, _midpoints(sv).numpy(), pos, b)
    idx.copy_(torch.from_numpy(pos))
    torch.gather(sv, -1, idx, out=v)
    torch.sub(w, v, out=v)
    v.mul_(v)  # (w − ŵ)², as ** 2
    if cw is not None:
        v.mul_(cw)
    return v.sum(-1)


def _planes(w: torch.Tensor, wn: np.ndarray, alpha: torch.Tensor, cw: torch.Tensor | None,
            scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """B [N, C, q] (±1: the planes of each weight's nearest code, as ``signs[nearest_codes(w, α)[0]]``)
    and B·diag(cw), in ``scratch``'s buffers."""
    n, c = w.shape
    q = alpha.shape[0]
    _, mids, code = codebook(alpha)
    b, pos, idx, _ = scratch.views((n, c))
    _below(wn, mids.numpy(), pos, b)
    idx.copy_(torch.from_numpy(pos))
    codes = torch.gather(code, 1, idx, out=scratch.idx[n * c : 2 * n * c].view(n, c))
    B = torch.index_select(_SIGNS[q], 0, codes.view(-1), out=scratch.v[: n * c * q].view(n * c, q)).view(n, c, q)
    return B, (B if cw is None else torch.mul(B, cw[None, :, None], out=scratch.bw[: n * c * q].view(n, c, q)))


def _grid(a: torch.Tensor, scale_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What the rounding of the unrounded a [q, N] starts from and tries (:func:`_choose_scales`):
    (α [q, N]: the nearest representable values, candidates [S, q, N]). Plane i tries lo, hi (and
    pow2x2: the powers of two around α, a subset of its grid) in this order; the one of lo/hi that
    α[i] already holds would score the same error again (no strict improvement), so the other
    comes first and that one is left out."""
    lo, hi, *pow2 = scale_neighbours(a, scale_mode, with_pow2=True)  # pow2 ⊂ pow2x2
    near_lo = a - lo <= hi - a
    return torch.where(near_lo, lo, hi), torch.stack([torch.where(near_lo, hi, lo)] + pow2)


def _choose_scales(w: torch.Tensor, a: torch.Tensor, scale_mode: str, cw: torch.Tensor | None = None,
                   wn: np.ndarray | None = None, scratch: _Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rounded scales for w [N, C] near the unrounded a [q, N]: start from the nearest representable
    values, then per plane keep the neighbour below or above that lowers the row's error (pow2x2
    also tries the powers of two around α, a subset of its grid). Returns (α, error)."""
    return _round_in_grid(w, *_grid(a, scale_mode), cw, wn, scratch)


def _round_in_grid(w, alpha, cands, cw, wn, scratch):
    """:func:`_choose_scales` from its :func:`_grid`. The candidates of plane i are tried in turn (a
    strict improvement replaces the current scale), their errors computed in one batch: the other
    planes do not change meanwhile."""
    scratch = scratch or _Scratch(w.numel(), len(cands))
    alpha = alpha.clone()
    err = _sq_err(w, alpha, cw, wn, scratch)
    for i in range(alpha.shape[0]):
        alts = alpha.expand(len(cands), *alpha.shape).clone()
        alts[:, i] = cands[:, i]
        errs = _sq_err(w, alts, cw, wn, scratch)
        for c in range(len(cands)):
            better = errs[c] < err
            err = torch.where(better, errs[c], err)
            alpha[i] = torch.where(better, cands[c, i], alpha[i])
    return alpha, err


FIT_ROWS = 4096  # rows fitted at a time (bounds the scratch buffers: ~30 MB at G = 128)


def fit_group(w: torch.Tensor, bits: int, scale_mode: str = "pow2", iters: int = 6,
              col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCQ fit of w [N, C] (one group, rows independent); returns rounded α [q, N] (see module doc).

    ``col_weight`` [C] ≥ 0 weights each column's squared error (GPTQ passes diag H: the
    activation energy of the column's input), so columns fed by large activations fit best.
    Computed in float32 on the CPU, ``FIT_ROWS`` rows at a time (the same numbers: every step is
    per row)."""
    w = w.detach().to("cpu", torch.float32).contiguous()
    cw = None if col_weight is None else (col_weight / col_weight.mean().clamp_min(1e-30)).to("cpu", torch.float32)
    n = w.shape[0]
    if n <= FIT_ROWS:
        return _fit_rows(w, bits, scale_mode, iters, cw)
    step = -(-n // -(-n // FIT_ROWS))  # equal chunks of at most FIT_ROWS
    return torch.cat([_fit_rows(w[r : r + step], bits, scale_mode, iters, cw) for r in range(0, n, step)], dim=1)


def _fit_rows(w: torch.Tensor, bits: int, scale_mode: str, iters: int, cw: torch.Tensor | None) -> torch.Tensor:
    wn = w.numpy()
    n = w.shape[0]
    r = w.clone()
    a = torch.empty(bits, n, dtype=w.dtype)
    for i in range(bits):  # greedy init
        a[i] = r.abs().mean(1)
        r -= a[i, :, None] * torch.where(r >= 0, 1.0, -1.0).to(w.dtype)
    scratch = _Scratch(w.numel(), 3 if scale_mode == "pow2x2" else 1, bits)
    start, cands = _grid(a, scale_mode)
    best_alpha, best_err = _round_in_grid(w, start, cands, cw, wn, scratch)
    eye = 1e-4 * w.shape[1] * torch.eye(bits, dtype=w.dtype)  # ridge: planes can coincide (BᵀB singular)
    # A round maps a row's scales α to F(α) = rounding of the least-squares scales for the planes B
    # of α: the same function every round, so a row leaves the loop (its best is final) when
    #  * the least-squares scales fall into the same rounding grid as last round: F(α) = α without
    #    rounding again (a fixed point), or
    #  * F(α) equals α or the α before it (a fixed point or a 2-cycle: only scales already scored).
    grid = torch.cat([start[None], cands])  # [S + 1, q, N]: each row's last rounding grid
    alpha = best_alpha.clone()  # the latest α of every row
    prev = torch.full_like(alpha, float("nan"))  # the α before it (nan: none yet)
    rows = torch.arange(n)  # the rows still refining
    for _ in range(iters):
        wr, wrn = (w, wn) if len(rows) == n else (w[rows], wn[rows.numpy()])
        cur = alpha[:, rows]
        B, Bw = _planes(wr, wrn, cur, cw, scratch)  # [N, C, q]: B given the current scales, and B·D
        # weighted least squares: (BᵀDB) α = BᵀDw
        a_ls = torch.linalg.solve(Bw.transpose(1, 2) @ B + eye, Bw.transpose(1, 2) @ wr[:, :, None])[..., 0].T.abs()
        start, cands = _grid(a_ls, scale_mode)
        g = torch.cat([start[None], cands])
        moved = (g != grid[:, :, rows]).flatten(0, 1).any(0)
        grid[:, :, rows] = g
        if not moved.all():
            rows, cur, start, cands = rows[moved], cur[:, moved], start[:, moved], cands[:, :, moved]
            if not len(rows):
                break
            wr, wrn = w[rows], wn[rows.numpy()]
        new, err = _round_in_grid(wr, start, cands, cw, wrn, scratch)
        settled = (new == cur).all(0) | (new == prev[:, rows]).all(0)
        better = err < best_err[rows]
        best_err[rows[better]] = err[better]
        best_alpha[:, rows[better]] = new[:, better]
        prev[:, rows], alpha[:, rows] = cur, new
        rows = rows[~settled]
        if not len(rows):
            break
    return best_alpha


def _alpha_exps(alpha: torch.Tensor, scale_mode: str) -> torch.Tensor:
    return round_scales(alpha, scale_mode)[1]


# -- whole matrices -----------------------------------------------------------------------------


def quantize_bcq(w: np.ndarray, bits: int, group: int, scale_mode: str = "pow2", iters: int = 6) -> BcqResult:
    """Plain BCQ of W [N, K] (weight error only), group by group."""
    return quantize_gptq(w, None, bits, group, scale_mode=scale_mode, iters=iters)


def _gptq_setup(W: torch.Tensor, h: np.ndarray, damp: float, act_order: bool):
    """(W, H, perm, U) for the GPTQ loop: dead columns zeroed (H_jj = 1), columns permuted by
    decreasing H_jj with ``act_order``, H damped, U = upper Cholesky factor of H⁻¹ (float64).
    W [N, K] is changed in place before the permutation."""
    k = W.shape[1]
    H = torch.as_tensor(np.asarray(h, np.float64)).clone()
    if H.shape != (k, k):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({k}, {k})")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    return W, H, perm, U


def gptq(w: np.ndarray, h: np.ndarray | None, group: int, fit, nearest, *, damp: float = 0.01,
         act_order: bool = False, block: int | None = None) -> torch.Tensor:
    """The GPTQ column loop shared by the grids (BCQ here, FDB in fdb.py): returns codes uint8 [N, K].

    ``fit(g, W_g [N, C], col_weight [C] | None)`` (torch) fits group g's parameters on the group's
    current (compensated) weights when its first column is reached; ``nearest(g, w)`` (numpy, w
    float32 [N, C], a column or a whole group) returns (codes [N, C], values float32 [N, C]) in
    group g's fitted grid. ``h=None``: no calibration data, each group fitted on its weights as
    they are (no error propagation). Damping, dead columns, activation order and the lazy block
    updates as in the module docstring. The per-column steps run in numpy on views of the torch
    tensors (a few µs per call instead of torch's ~10); the block matmuls stay in torch.
    """
    W = torch.as_tensor(np.asarray(w, np.float32)).clone()
    n, k = W.shape
    ng = -(-k // group)
    codes = np.zeros((n, k), np.uint8)
    if h is None:
        for g in range(ng):
            c0, c1 = g * group, min(k, (g + 1) * group)
            fit(g, W[:, c0:c1], None)
            codes[:, c0:c1] = nearest(g, W[:, c0:c1].numpy())[0]
        return torch.from_numpy(codes)
    W, H, perm, U = _gptq_setup(W, h, damp, act_order)
    hdiag = torch.diag(H).float()  # activation energy per (permuted) column: weights the group fits
    U = U.float()
    Un = np.ascontiguousarray(U.numpy())  # rows contiguous for the column steps (U stays as it is for the matmuls)
    grp = perm // group  # stored group of each processed column
    grpn, permn = grp.numpy(), perm.numpy()
    fitted = np.zeros(ng, np.bool_)
    block = block or group
    upd = np.empty((min(block, k), n), np.float32)  # the rank-1 updates, reused
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1t = W[:, i1:i2].T.contiguous().numpy()  # [i2 − i1, N]: the block's columns as contiguous rows
        Err1 = torch.zeros(n, i2 - i1)
        Err1n = Err1.numpy()
        for j in range(i2 - i1):
            col = i1 + j
            g = int(grpn[col])
            if not fitted[g]:
                pos = torch.nonzero(grp == g)[:, 0]  # processed positions of the group (all >= col)
                cur = W[:, pos].clone()
                inb = pos < i2
                cur[:, inb] = torch.from_numpy(W1t[(pos[inb] - i1).numpy()]).T
                out = ~inb
                if out.any() and j > 0:  # pending (lazy) updates of this block for later columns
                    cur[:, out] -= Err1[:, :j] @ U[i1:col][:, pos[out]]
                fit(g, cur, hdiag[pos])
                fitted[g] = True
            idx, val = nearest(g, W1t[j][:, None])
            codes[:, permn[col]] = idx[:, 0]
            err = (W1t[j] - val[:, 0]) / Un[col, col]
            t = np.multiply(Un[col, col:i2, None], err, out=upd[: i2 - col])  # W[:, k] -= err·U[col, k], k >= col
            np.subtract(W1t[j:], t, out=W1t[j:])
            Err1n[:, j] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return torch.from_numpy(codes)


def quantize_gptq(w: np.ndarray, h: np.ndarray | None, bits: int, group: int, *, scale_mode: str = "pow2",
                  damp: float = 0.01, act_order: bool = False, iters: int = 6, block: int | None = None) -> BcqResult:
    """BCQ of W [N, K] inside GPTQ error compensation with H [K, K] = XᵀX (module docstring).

    ``h=None`` means no calibration data: plain BCQ, group by group (no error propagation).
    """
    _check(bits, group, scale_mode)
    n, k = np.shape(w)
    alpha = torch.zeros(bits, n, -(-k // group))
    books: dict[int, tuple] = {}

    def fit(g, cur, col_weight):
        alpha[:, :, g] = fit_group(cur, bits, scale_mode, iters, col_weight=col_weight)
        books[g] = _np_book(codebook(alpha[:, :, g]))

    codes = gptq(w, h, group, fit, lambda g, col: _np_lookup(books[g], col), damp=damp, act_order=act_order,
                 block=block)
    return _result(codes, alpha, bits, group, scale_mode)


def _np_book(book) -> tuple[np.ndarray, ...]:
    """A :func:`codebook` for :func:`_np_lookup`: (sorted values, midpoints [N, M], midpoints [M, N],
    codes uint8), values and codes flattened row by row."""
    sv, mids, code = book
    mids = np.ascontiguousarray(mids.numpy())
    return sv.numpy().ravel(), mids, np.ascontiguousarray(mids.T), code.numpy().astype(np.uint8).ravel()


def _np_lookup(book, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`lookup` in numpy: (codes uint8 [N, C], values [N, C]) of w float32 [N, C]."""
    sv, mids, mids_t, code = book
    n, m = mids.shape
    if w.shape[1] == 1:  # one column (the GPTQ loop): compares of contiguous vectors
        col = np.ascontiguousarray(w[:, 0])
        pos = np.greater(col, mids_t[0]).view(np.uint8)
        b = np.empty(n, np.bool_)
        for i in range(1, m):
            np.greater(col, mids_t[i], out=b)
            pos += b.view(np.uint8)
        flat = (np.arange(n) * (m + 1) + pos)[:, None]
    else:
        flat = _below(w, mids) + (np.arange(n) * (m + 1))[:, None]
    return code[flat], sv[flat]


def _result(codes: torch.Tensor, alpha: torch.Tensor, bits: int, group: int, scale_mode: str) -> BcqResult:
    exps = _alpha_exps(alpha, scale_mode)  # α are already representable: this recovers exponents
    return BcqResult(codes.numpy(), exps.numpy().astype(np.int8), bits, group, scale_mode)


def quantize_rtn(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Round-to-nearest baseline: uniform asymmetric ``bits``-bit per group; returns dequantized W."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    ng = -(-k // group)
    pad = np.zeros((n, ng * group), np.float32)
    pad[:, :k] = w
    g = pad.reshape(n, ng, group)
    if k % group:  # the last partial group: its range over real columns only
        last = g[:, -1, : k - (ng - 1) * group]
        mn_last, mx_last = last.min(1), last.max(1)
    mn, mx = g.min(2), g.max(2)
    if k % group:
        mn[:, -1], mx[:, -1] = mn_last, mx_last
    levels = 2**bits - 1
    s = np.where(mx > mn, (mx - mn) / levels, 1.0)[..., None]
    z = np.round(-mn[..., None] / s)
    qv = np.clip(np.round(g / s) + z, 0, levels)
    return (s * (qv - z)).reshape(n, ng * group)[:, :k].astype(np.float32)


def quantize_gptq_uniform(w: np.ndarray, h: np.ndarray, bits: int, group: int, *, damp: float = 0.01,
                          act_order: bool = True, clip_grid: int = 9, clip_min: float = 0.6) -> np.ndarray:
    """GPTQ with a *uniform* asymmetric grid per group (the usual integer weight-only quantizer), as
    the reference point for BCQ at the same bits: returns the dequantized W [N, K].

    The same compensation as :func:`quantize_gptq` (damping, act-order, U = chol(H⁻¹)ᵀ), a group's
    grid fixed when its first column is reached: scale s = f·(max − min)/(2^q − 1) and zero point
    z = round(−f·min/s) over the group's current weights (min ≤ 0 ≤ max), f the best of ``clip_grid``
    shrink factors in [clip_min, 1] for the diag(H)-weighted squared error."""
    W, H, perm, U = _gptq_setup(torch.as_tensor(np.asarray(w, np.float64)).clone(), h, damp, act_order)
    k = W.shape[1]
    hd = torch.diag(H)
    grp = perm // group
    maxq = 2**bits - 1
    grids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    Q = torch.zeros_like(W)
    for j in range(k):
        g = int(grp[j])
        if g not in grids:
            pos = torch.nonzero(grp == g)[:, 0]
            cur = W[:, pos]
            mn, mx = cur.min(1).values.clamp(max=0), cur.max(1).values.clamp(min=0)
            best = None
            for f in np.linspace(1.0, clip_min, clip_grid):
                sc = ((mx - mn) * f / maxq).clamp_min(1e-12)
                z = torch.round(-mn * f / sc)
                qv = sc[:, None] * (torch.clamp(torch.round(cur / sc[:, None]) + z[:, None], 0, maxq) - z[:, None])
                e = ((qv - cur) ** 2 * hd[pos]).sum(1)
                if best is None:
                    best = (e, sc, z)
                else:
                    m = e < best[0]
                    best = (torch.where(m, e, best[0]), torch.where(m, sc, best[1]), torch.where(m, z, best[2]))
            grids[g] = best[1:]
        sc, z = grids[g]
        Q[:, j] = sc * (torch.clamp(torch.round(W[:, j] / sc) + z, 0, maxq) - z)
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    out = torch.zeros_like(Q)
    out[:, perm] = Q
    return out.float().numpy()


# -- error metrics --------------------------------------------------------------------------------


def relative_weight_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F."""
    return float(np.linalg.norm(w - w_hat) / max(np.linalg.norm(w), 1e-30))


def relative_output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """‖XWᵀ − XŴᵀ‖_F / ‖XWᵀ‖_F computed from H = XᵀX: sqrt(tr(ΔHΔᵀ) / tr(WHWᵀ))."""
    w64, d = np.asarray(w, np.float64), np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    h = np.asarray(h, np.float64)
    num = np.sum((d @ h) * d)  # tr(Δ H Δᵀ) through BLAS (a 3-operand einsum loops in C: 30x slower)
    den = np.sum((w64 @ h) * w64)
    return float(np.sqrt(max(num, 0.0) / max(den, 1e-30)))
