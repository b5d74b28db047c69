"""Tests of shiftc.sampling against independent reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shiftc.errors import UsageError
from shiftc.sampling import Sampler, SamplerConfig, log_softmax, softmax, top_k_indices

# Empirical frequencies of N_DRAWS draws must match the target distribution within FREQ_ATOL
# (the standard error of one frequency is at most 0.5 / sqrt(20000) = 0.0035).
N_DRAWS = 20_000
FREQ_ATOL = 0.02
# Chi-square statistic must stay below its 1 - CHI2_ALPHA quantile.
CHI2_ALPHA = 1e-6
# Mirostat: mean observed surprise over MIRO_STEPS steps within MIRO_ATOL_BITS of tau.
MIRO_STEPS = 500
MIRO_ATOL_BITS = 1.0
PROB_ATOL = 1e-12


def ref_softmax(z, t=1.0):
    z = np.asarray(z, dtype=np.float64) / t
    e = np.exp(z - z.max())
    return e / e.sum()


def rand_logits(seed, vocab=200, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(vocab) * scale).astype(np.float32)


def draw(sampler, logits, n):
    return np.array([sampler.sample(logits) for _ in range(n)])


def check_frequencies(tokens, target):
    freq = np.bincount(tokens, minlength=target.size) / tokens.size
    assert np.abs(freq - target).max() < FREQ_ATOL
    assert freq[target == 0].sum() == 0
    support = target > 0
    if support.sum() > 1:
        chi2 = tokens.size * ((freq[support] - target[support]) ** 2 / target[support]).sum()
        scipy_stats = pytest.importorskip("scipy.stats")
        assert chi2 < scipy_stats.chi2.ppf(1 - CHI2_ALPHA, support.sum() - 1)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def test_softmax_stable():
    z = np.array([1000.0, 999.0, -1000.0, -np.inf], dtype=np.float32)
    p = softmax(z)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, ref_softmax([0.0, -1.0, -2000.0, -np.inf]), atol=PROB_ATOL)
    np.testing.assert_allclose(np.exp(log_softmax(z, 0.5)), ref_softmax(z, 0.5), atol=PROB_ATOL)
    assert log_softmax(z)[3] == -np.inf


def test_top_k_indices_ties():
    p = np.array([0.1, 0.3, 0.3, 0.05, 0.25])
    assert top_k_indices(p, 1).tolist() == [1]
    assert top_k_indices(p, 2).tolist() == [1, 2]
    assert top_k_indices(p, 3).tolist() == [1, 2, 4]
    assert top_k_indices(p, 10).tolist() == [1, 2, 4, 0, 3]


# --------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    s = Sampler(greedy=True)
    for seed in range(50):
        z = rand_logits(seed)
        assert s.sample(z) == int(np.argmax(z))
    assert s.sample(np.array([1.0, 5.0, 5.0, 2.0])) == 1  # first max on ties
    assert Sampler(greedy=True, temperature=0.0).sample(np.array([0.0, 3.0])) == 1


def test_top_k_within_k_largest():
    for k in (1, 2, 5, 20):
        for seed in range(40):
            z = rand_logits(seed)
            allowed = set(np.argsort(-z)[:k].tolist())
            s = Sampler(top_k=k, temperature=1.5, seed=seed)
            assert set(draw(s, z, 25).tolist()) <= allowed


def test_top_p_within_nucleus():
    for top_p in (0.1, 0.5, 0.9):
        for seed in range(40):
            z = rand_logits(seed)
            p = ref_softmax(z)
            order = np.argsort(-p)
            n = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)  # smallest prefix >= top_p
            nucleus = set(order[:n].tolist())
            s = Sampler(top_p=top_p, seed=seed)
            got = draw(s, z, 25)
            assert set(got.tolist()) <= nucleus
            np.testing.assert_allclose(s.distribution(z)[order[:n]].sum(), 1.0, atol=1e-9)


def test_temperature_to_zero_approaches_greedy():
    z = rand_logits(3, vocab=50, scale=1.0)
    best = int(np.argmax(z))
    p_best = [Sampler(temperature=t).distribution(z)[best] for t in (1.0, 0.5, 0.1, 0.01, 1e-3)]
    assert all(a <= b for a, b in zip(p_best, p_best[1:]))  # 1.0 exactly once saturated
    assert p_best[0] < p_best[1] < p_best[2]
    assert p_best[-1] > 1 - 1e-9
    assert (draw(Sampler(temperature=1e-3, seed=1), z, 200) == best).all()


def test_same_seed_same_sequence():
    zs = [rand_logits(i) for i in range(100)]
    for kw in ({}, {"top_k": 10}, {"top_p": 0.8, "temperature": 0.7}, {"mirostat_tau": 3.0}):
        s1, s2 = Sampler(seed=42, **kw), Sampler(seed=42, **kw)
        seq1 = [s1.sample(z) for z in zs]
        seq2 = [s2.sample(z) for z in zs]
        assert seq1 == seq2
        s1.reset(seed=42)
        assert [s1.sample(z) for z in zs] == seq1
        seq3 = [Sampler(seed=43, **kw).sample(z) for z in zs]
        assert seq3 != seq1
    g1, g2 = np.random.default_rng(7), np.random.default_rng(7)
    assert draw(Sampler(seed=g1), zs[0], 50).tolist() == draw(Sampler(seed=g2), zs[0], 50).tolist()


def test_plain_sampling_matches_softmax():
    z = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2, -3.0, 0.8], dtype=np.float32)
    check_frequencies(draw(Sampler(seed=0), z, N_DRAWS), ref_softmax(z))
    check_frequencies(draw(Sampler(temperature=2.0, seed=1), z, N_DRAWS), ref_softmax(z, 2.0))


def test_top_k_and_top_p_distributions():
    z = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2, -3.0, 0.8], dtype=np.float32)
    p = ref_softmax(z, 0.8)
    order = np.argsort(-p)
    # top-k = 4 after temperature 0.8
    ref = np.zeros_like(p)
    ref[order[:4]] = p[order[:4]]
    ref /= ref.sum()
    s = Sampler(temperature=0.8, top_k=4, seed=2)
    np.testing.assert_allclose(s.distribution(z), ref, atol=PROB_ATOL)
    check_frequencies(draw(s, z, N_DRAWS), ref)
    # then top-p = 0.7 of the top-4 mass
    q = p[order[:4]] / p[order[:4]].sum()
    n = int(np.searchsorted(np.cumsum(q), 0.7) + 1)
    ref2 = np.zeros_like(p)
    ref2[order[:n]] = p[order[:n]]
    ref2 /= ref2.sum()
    s2 = Sampler(temperature=0.8, top_k=4, top_p=0.7, seed=3)
    np.testing.assert_allclose(s2.distribution(z), ref2, atol=PROB_ATOL)
    check_frequencies(draw(s2, z, N_DRAWS), ref2)


# --------------------------------------------------------------------------------------------
# Mirostat v2
# --------------------------------------------------------------------------------------------


def zipf_logits(vocab=1000, a=1.1):
    return (-a * np.log(np.arange(1, vocab + 1))).astype(np.float32)


@pytest.mark.parametrize("tau,temperature", [(3.0, 1.0), (5.0, 1.0), (4.0, 0.7)])
def test_mirostat_v2(tau, temperature):
    z = zipf_logits()
    eta = 0.1
    surprise = -np.log2(ref_softmax(z, temperature))  # under the original tempered softmax
    s = Sampler(mirostat_tau=tau, mirostat_eta=eta, temperature=temperature, seed=0)
    assert s.mu == 2 * tau
    observed = []
    for _ in range(MIRO_STEPS):
        mu = s.mu
        tok = s.sample(z)
        # truncation: only tokens with surprise <= mu (or the top token when none is)
        assert surprise[tok] <= mu + 1e-9 or (surprise.min() > mu and tok == int(np.argmax(z)))
        # the distribution drawn from is the renormalised truncation
        assert math.isclose(s.last_surprise, surprise[tok], abs_tol=1e-9)
        assert math.isclose(s.mu, mu - eta * (surprise[tok] - tau), abs_tol=1e-9)
        observed.append(surprise[tok])
    assert abs(np.mean(observed) - tau) < MIRO_ATOL_BITS
    s.reset()
    assert s.mu == 2 * tau


def test_mirostat_distribution_is_truncation():
    z = zipf_logits(200)
    s = Sampler(mirostat_tau=2.0, seed=0)
    p = ref_softmax(z)
    keep = -np.log2(p) <= 4.0  # mu = 2 * tau
    ref = np.where(keep, p, 0.0) / p[keep].sum()
    np.testing.assert_allclose(s.distribution(z), ref, atol=PROB_ATOL)
    check_frequencies(draw(Sampler(mirostat_tau=2.0, mirostat_eta=1e-12, seed=1), z, N_DRAWS), ref)


def test_mirostat_empty_truncation_keeps_top():
    s = Sampler(mirostat_tau=0.01, mirostat_eta=0.5, seed=0)  # mu = 0.02 bits
    z = np.zeros(8, dtype=np.float32)
    z[3] = 0.1  # every surprise is ~3 bits > mu
    assert s.sample(z) == 3


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        ({"top_k": 0}, "--top-k"),
        ({"top_k": 2.5}, "--top-k"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.5}, "--top-p"),
        ({"temperature": 0.0}, "--temperature"),
        ({"temperature": -1.0}, "--temperature"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"mirostat_tau": 0.0}, "--mirostat-tau"),
        ({"mirostat_tau": -2.0}, "--mirostat-tau"),
        ({"mirostat_tau": 3.0, "mirostat_eta": 0.0}, "--mirostat-eta"),
        ({"mirostat_tau": 3.0, "top_k": 5}, "--top-k"),
        ({"mirostat_tau": 3.0, "top_p": 0.9}, "--top-p"),
    ],
)
def test_validation(kwargs, flag):
    with pytest.raises(UsageError, match=flag) as ei:
        Sampler(**kwargs)
    assert ei.value.exit_code == 2


def test_config_object_and_bad_logits():
    cfg = SamplerConfig(top_k=3)
    assert cfg.mode == "sample" and SamplerConfig(greedy=True).mode == "greedy"
    assert SamplerConfig(mirostat_tau=3.0).mode == "mirostat"
    s = Sampler(config=cfg, seed=0)
    assert s.config is cfg
    with pytest.raises(ValueError):
        s.sample(np.zeros((2, 3)))
    from shiftc.errors import BadInputError

    with pytest.raises(BadInputError):
        s.sample(np.array([0.0, np.nan]))


@pytest.mark.parametrize("scale", [0.5, 8.0])  # nucleus beyond / within the 1024 most likely
def test_top_p_large_vocab(scale):
    z = rand_logits(11, vocab=5000, scale=scale)
    p = ref_softmax(z)
    order = np.argsort(-p, kind="stable")
    n = int(np.searchsorted(np.cumsum(p[order]), 0.9) + 1)
    assert (n > 1024) == (scale == 0.5)
    ref = np.zeros_like(p)
    ref[order[:n]] = p[order[:n]]
    ref /= ref.sum()
    np.testing.assert_allclose(Sampler(top_p=0.9).distribution(z), ref, atol=PROB_ATOL)
