"""Next-token samplers over numpy logits.

A :class:`Sampler` turns one logits vector (``float [vocab]``) into one token id. It is seeded
(``numpy.random.Generator``), so the same seed and the same logits give the same tokens.

Modes
-----
greedy
    ``argmax_i z_i`` (the first index on ties). Temperature, top-k and top-p are irrelevant.
temperature / top-k / top-p (applied in this order, then one draw)
    1. temperature ``T > 0``: ``p_i = softmax(z / T)_i = exp((z_i - m) / T) / sum_j exp((z_j - m) / T)``
       with ``m = max_j z_j`` (subtracting the max keeps ``exp`` from overflowing; computed in
       float64).
    2. top-k: keep the ``k`` tokens of largest ``p`` (ties at the boundary broken by lower
       index), zero the rest.
    3. top-p (nucleus): sort the kept tokens by ``p`` descending and keep the shortest prefix
       whose mass reaches ``top_p`` of the kept mass: token ``j`` (in sorted order) is kept iff
       ``sum_{i<j} p_(i) < top_p * sum_i p_(i)``. At least one token is always kept.
    4. draw ``i`` with probability ``p_i / sum_{kept} p`` (inverse CDF on one uniform draw).
Mirostat v2 (Basu et al., 2021, "Mirostat: a neural text decoding algorithm that directly
controls perplexity")
    With ``p = softmax(z / T)`` and surprise ``s_i = -log2 p_i`` (bits):
    1. truncate: keep ``{i : s_i <= mu}`` (if empty, keep the most likely token);
    2. draw ``i`` from ``p`` renormalised over the kept tokens;
    3. observed surprise ``s = -log2 p_i`` under the ORIGINAL (untruncated) ``p``;
    4. ``mu <- mu - eta * (s - tau)``.
    ``mu`` starts at ``2 * tau`` and persists across calls (one generation); :meth:`Sampler.reset`
    restores it. Top-k / top-p cannot be combined with Mirostat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shiftc.errors import BadInputError, UsageError

_LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# Pure helpers (float64, numerically stable)
# --------------------------------------------------------------------------------------------


def _check_logits(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits)
    if z.ndim != 1 or z.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty 1-D array [vocab], got shape {z.shape}")
    z = z.astype(np.float64, copy=False)
    if np.isnan(z).any() or not np.isfinite(z.max()):
        raise BadInputError(
            "the model produced logits with NaN or without any finite value; "
            "the compiled model's output is broken"
        )
    return z


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``log softmax(z / T)`` in float64: ``(z - m) / T - log sum_j exp((z_j - m) / T)``,
    ``m = max z``. ``-inf`` logits give ``-inf``."""
    z = _check_logits(logits)
    x = (z - z.max()) / temperature
    return x - np.log(np.exp(x).sum())


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(z / T)`` in float64 with the max subtracted first (no overflow)."""
    z = _check_logits(logits)
    e = np.exp((z - z.max()) / temperature)
    return e / e.sum()


def top_k_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries, sorted by value descending, then index ascending."""
    n = probs.shape[0]
    if k >= n:
        cand = np.arange(n)
    else:
        # A partition finds the k-th largest value; every strictly larger entry is in, and the
        # ties at that value are filled in index order.
        kth = np.partition(probs, n - k)[n - k]
        above = np.flatnonzero(probs > kth)
        ties = np.flatnonzero(probs == kth)[: k - above.size]
        cand = np.concatenate([above, ties])
    order = np.lexsort((cand, -probs[cand]))
    return cand[order]


def top_p_cut(sorted_probs: np.ndarray, top_p: float) -> int:
    """How many of ``sorted_probs`` (descending) the nucleus keeps: the smallest ``n`` with
    ``sum_{i<n} p_(i) >= top_p * sum_i p_(i)`` (at least 1)."""
    csum = np.cumsum(sorted_probs)
    # token j is kept iff the mass before it, csum[j] - p[j], is < top_p * total
    before = csum - sorted_probs
    n = int(np.count_nonzero(before < top_p * csum[-1]))
    return max(1, n)


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling parameters (see the module docstring for the formulas).

    ``top_k=None`` and ``top_p=None`` (or 1.0) disable those filters; ``mirostat_tau`` set
    selects Mirostat v2.
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float = 0.1

    def validate(self) -> "SamplerConfig":
        """Raise :class:`UsageError` naming the flag of the first bad value."""
        if not self.greedy and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UsageError(
                f"--temperature must be > 0, got {self.temperature} "
                "(use greedy decoding for temperature 0)"
            )
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
            raise UsageError(f"--top-k must be an integer >= 1, got {self.top_k}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.mirostat_tau is not None:
            if not (math.isfinite(self.mirostat_tau) and self.mirostat_tau > 0):
                raise UsageError(f"--mirostat-tau must be > 0, got {self.mirostat_tau}")
            if not (math.isfinite(self.mirostat_eta) and self.mirostat_eta > 0):
                raise UsageError(f"--mirostat-eta must be > 0, got {self.mirostat_eta}")
            if self.greedy:
                raise UsageError("--mirostat-tau cannot be combined with greedy decoding")
            if self.top_k is not None:
                raise UsageError("--top-k cannot be combined with --mirostat-tau")
            if self.top_p is not None and self.top_p < 1.0:
                raise UsageError("--top-p cannot be combined with --mirostat-tau")
        return self

    @property
    def mode(self) -> str:
        if self.greedy:
            return "greedy"
        return "mirostat" if self.mirostat_tau is not None else "sample"


class Sampler:
    """Draw token ids from logits.

    ``Sampler(greedy=False, temperature=1.0, top_k=None, top_p=None, mirostat_tau=None,
    mirostat_eta=0.1, seed=0)`` or ``Sampler(config=SamplerConfig(...), seed=...)``.
    ``seed`` may also be a ``numpy.random.Generator`` (used as is).

    Attributes: ``mu`` (Mirostat state, ``None`` otherwise), ``last_surprise`` (bits, of the last
    token under ``softmax(z / T)``; ``None`` for greedy decoding).
    """

    def __init__(
        self,
        *,
        greedy: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        mirostat_tau: float | None = None,
        mirostat_eta: float = 0.1,
        seed: int | np.random.Generator | None = 0,
        config: SamplerConfig | None = None,
    ):
        if config is None:
            config = SamplerConfig(greedy, temperature, top_k, top_p, mirostat_tau, mirostat_eta)
        self.config = config.validate()
        self._seed = seed
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.mu: float | None = None
        self.last_surprise: float | None = None
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Restore Mirostat's ``mu = 2 * tau``; with ``seed``, also reseed the generator."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.mu = 2.0 * self.config.mirostat_tau if self.config.mirostat_tau is not None else None
        self.last_surprise = None

    # -- distributions ------------------------------------------------------------------------

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The float64 ``[vocab]`` distribution the next :meth:`sample` draws from (without
        drawing and without changing state): one-hot for greedy, temperature/top-k/top-p
        truncated and renormalised, or the Mirostat truncation at the current ``mu``."""
        idx, p = self._candidates(logits)[:2]
        out = np.zeros(np.asarray(logits).shape[0], dtype=np.float64)
        out[idx] = p / p.sum()
        return out

    def _candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(kept token ids, their unnormalised probabilities, log2 p of all tokens)."""
        cfg = self.config
        if cfg.greedy:
            z = _check_logits(logits)
            i = int(np.argmax(z))
            return np.array([i]), np.array([1.0]), np.zeros(0)
        logp = log_softmax(logits, cfg.temperature)
        p = np.exp(logp)
        if cfg.mirostat_tau is not None:
            surprise = -logp / _LN2
            idx = np.flatnonzero(surprise <= self.mu)
            if idx.size == 0:
                idx = np.array([int(np.argmax(p))])
            return idx, p[idx], logp
        use_p = cfg.top_p is not None and cfg.top_p < 1.0
        if cfg.top_k is not None:
            idx = top_k_indices(p, int(cfg.top_k))  # sorted descending
        elif use_p:
            # The nucleus is a prefix of the sorted tokens: try the 1024 most likely first
            # (p sums to 1 here) and sort the whole vocabulary only if they are not enough.
            idx = top_k_indices(p, 1024)
            if p[idx].sum() < cfg.top_p:
                idx = np.argsort(-p, kind="stable")
        else:
            return np.arange(p.shape[0]), p, logp
        if use_p:
            idx = idx[: top_p_cut(p[idx], cfg.top_p)]
        return idx, p[idx], logp

    # -- drawing --------------------------------------------------------------------------------

    def sample(self, logits: np.ndarray) -> int:
        """One token id; updates ``mu`` (Mirostat) and ``last_surprise``."""
        idx, p, logp = self._candidates(logits)
        if idx.size == 1:
            tok = int(idx[0])
        else:
            csum = np.cumsum(p)
            u = self.rng.random() * csum[-1]
            j = min(int(np.searchsorted(csum, u, side="right")), idx.size - 1)
            tok = int(idx[j])
        if self.config.greedy:
            self.last_surprise = None
            return tok
        s = float(-logp[tok] / _LN2)
        self.last_surprise = s
        if self.config.mirostat_tau is not None:
            self.mu -= self.config.mirostat_eta * (s - self.config.mirostat_tau)
        return tok

    __call__ = sample

    def __repr__(self) -> str:
        return f"Sampler({self.config}, mu={self.mu})"
