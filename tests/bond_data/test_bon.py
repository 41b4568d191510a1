"""Quantiles against sorting; pool BoN weights against Monte Carlo Best-of-n selection with
replacement; unbiased weights against the enumeration of every n-subset, against Best-of-n of the
true distribution (Monte Carlo), and against exact integer math at a million samples."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from bond_data import bon


def brute_quantiles(group, reward):
    p_lt, p_le = np.empty(len(reward)), np.empty(len(reward))
    for i in range(len(reward)):
        peers = reward[group == group[i]]
        p_lt[i] = np.mean(peers < reward[i])
        p_le[i] = np.mean(peers <= reward[i])
    return p_lt, p_le


def monte_carlo_bon(reward, n, draws, rng):
    """Draw n pool indices with replacement, keep the best, break ties uniformly; frequencies."""
    k = len(reward)
    idx = rng.integers(0, k, size=(draws, n))
    r = reward[idx]
    best = r.max(axis=1, keepdims=True)
    tie_break = rng.random((draws, n)) * (r == best)  # uniform among the maxima
    winner = idx[np.arange(draws), tie_break.argmax(axis=1)]
    return np.bincount(winner, minlength=k) / draws


@pytest.mark.parametrize("ties", [False, True])
def test_quantiles_match_sorting(ties):
    rng = np.random.default_rng(0)
    group = rng.integers(0, 7, size=300)
    reward = rng.integers(0, 5, size=300).astype(float) if ties else rng.normal(size=300)
    p_lt, p_le = bon.empirical_quantiles(group, reward)
    ref_lt, ref_le = brute_quantiles(group, reward)
    np.testing.assert_allclose(p_lt, ref_lt)
    np.testing.assert_allclose(p_le, ref_le)


def test_quantiles_with_string_groups_and_negative_rewards():
    group = np.array(["b", "a", "b", "a", "b"])
    reward = np.array([-1.0, 3.0, -1.0, -5.0, 2.0])
    p_lt, p_le = bon.empirical_quantiles(group, reward)
    np.testing.assert_allclose(p_lt, [0, 0.5, 0, 0, 2 / 3])
    np.testing.assert_allclose(p_le, [2 / 3, 1, 2 / 3, 0.5, 1])


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("reward", [
    [0.3, 1.2, -0.4, 2.5, 0.9, 0.1],  # no ties
    [1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.5, 0.0],  # ties at several levels
    [3.0, 3.0, 3.0, 3.0],  # all tied: uniform
])
def test_pool_weights_match_monte_carlo_selection_with_replacement(reward, n):
    reward = np.array(reward)
    k = len(reward)
    w = bon.bon_weights(np.zeros(k), reward, n, weighting="pool")
    assert w.sum() / k == pytest.approx(1.0, abs=1e-12)
    freq = monte_carlo_bon(reward, n, draws=400_000, rng=np.random.default_rng(n))
    np.testing.assert_allclose(freq, w / k, atol=4e-3)


def test_bon_weight_matches_theorem_sum_form():
    rng = np.random.default_rng(1)
    p_lt = rng.random(50) * 0.9
    p_le = p_lt + rng.random(50) * (1 - p_lt) + 1e-3
    for n in (1, 3, 16):
        ref = sum(p_le ** (n - i) * p_lt ** (i - 1) for i in range(1, n + 1))
        np.testing.assert_allclose(bon.bon_weight(p_lt, p_le, n), ref, rtol=1e-10)


def test_without_ties_weight_is_n_times_quantile_power():
    reward = np.arange(10.0)
    p_lt, p_le = bon.empirical_quantiles(np.zeros(10), reward)
    w = bon.bon_weight(p_lt, p_le, 4)
    # the empirical law has atoms, so compare with the exact discrete version, and check the
    # continuous-limit shape N p^(N-1) at the midpoint
    mid = (p_lt + p_le) / 2
    assert np.all(np.abs(w - 4 * mid**3) < 0.05)


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        bon.empirical_quantiles(np.zeros(3), np.array([1.0, np.nan, 2.0]))
    with pytest.raises(ValueError, match="n must be"):
        bon.bon_weight(np.array([0.0]), np.array([1.0]), 0)
    with pytest.raises(ValueError, match="n must be"):
        bon.unbiased_bon_weight(0, 1, 4, 0)
    with pytest.raises(ValueError, match="weighting must be"):
        bon.bon_weights(np.zeros(3), np.arange(3.0), 2, weighting="exact")
    with pytest.raises(ValueError, match="0 <= lt < le <= k"):
        bon.unbiased_bon_weight(np.array([1]), np.array([1]), np.array([4]), 2)


def test_unbiased_weights_need_n_at_most_k():
    group = np.array([0, 0, 0, 0, 1, 1, 1])  # pools of 4 and 3
    assert bon.bon_weights(group, np.arange(7.0), 3).shape == (7,)
    with pytest.raises(ValueError, match=r"need n <= k, but a pool has only k = 3 .*raise k.*weighting 'pool'"):
        bon.bon_weights(group, np.arange(7.0), 4)
    assert np.isfinite(bon.bon_weights(group, np.arange(7.0), 4, weighting="pool")).all()  # pool: any n


# ---- unbiased weights --------------------------------------------------------------------------
def enumerate_subsets(reward: np.ndarray, n: int) -> np.ndarray:
    """k * P(sample i is the best of a uniformly random n-subset), ties split uniformly among the
    subset's maxima: every subset, exact fractions."""
    k = len(reward)
    share = [Fraction(0)] * k
    for subset in itertools.combinations(range(k), n):
        best = max(reward[i] for i in subset)
        winners = [i for i in subset if reward[i] == best]
        for i in winners:
            share[i] += Fraction(1, len(winners))
    total = math.comb(k, n)
    return np.array([float(k * s / total) for s in share])


@pytest.mark.parametrize("reward", [
    [0.3, 1.2, -0.4, 2.5, 0.9, 0.1],  # no ties
    [1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.5, 0.0],  # ties at several levels, the top included
    [3.0, 3.0, 3.0, 3.0, 3.0],  # all tied: uniform
    [0.0, 1.0, 1.0, 1.0, 5.0, 2.0, 2.0, 0.0, 4.0, 1.0],  # a unique maximum above ties
])
def test_unbiased_weights_equal_the_enumeration_of_every_subset(reward):
    reward = np.array(reward)
    k = len(reward)
    for n in range(1, k + 1):  # n = k included: the pool's maxima share it
        w = bon.bon_weights(np.zeros(k), reward, n)
        np.testing.assert_allclose(w, enumerate_subsets(reward, n), rtol=1e-12, atol=1e-15, err_msg=f"n={n}")
        assert w.sum() / k == pytest.approx(1.0, abs=1e-12)


def test_unbiased_weights_are_unbiased_for_best_of_n_of_the_true_distribution():
    """Pools of k = 16 continuous uniform rewards, N = 8: the mean over pools of (1/k) sum_i w_i log u_i
    must be E[log u] under Beta(N, 1), -1/N, for unbiased weights; pool weights are Best-of-N with
    replacement from the pool: E = sum_r (w_r / k) E[log U_(r)], E[log U_(r)] = H_(r-1) - H_k."""
    k, n, pools = 16, 8, 20_000
    rng = np.random.default_rng(0)
    u = rng.random((pools, k))
    group = np.repeat(np.arange(pools), k)
    per_pool = {}
    for weighting in ("unbiased", "pool"):
        w = bon.bon_weights(group, u.ravel(), n, weighting).reshape(pools, k)
        per_pool[weighting] = (w * np.log(u)).mean(axis=1)  # [pools]
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, k + 1))])  # H_0 .. H_k
    w_rank = bon.bon_weights(np.zeros(k), np.arange(k, dtype=float), n, "pool")  # rank r = index + 1
    pool_exact = float(np.sum(w_rank / k * (harmonic[:k] - harmonic[k])))
    assert pool_exact == pytest.approx(-0.159, abs=1e-3)  # as Best-of-6.3 of the true distribution
    for weighting, expected in (("unbiased", -1.0 / n), ("pool", pool_exact)):
        x = per_pool[weighting]
        se = x.std(ddof=1) / math.sqrt(pools)
        assert abs(x.mean() - expected) < 4 * se, (weighting, x.mean(), expected, se)
    se = per_pool["pool"].std(ddof=1) / math.sqrt(pools)
    assert per_pool["pool"].mean() < -1.0 / n - 20 * se  # the pool weighting is biased, far beyond noise


def exact_weight(lt: int, le: int, k: int, n: int) -> float:
    return float(Fraction(k * (math.comb(le, n) - math.comb(lt, n)), math.comb(k, n) * (le - lt)))


@pytest.mark.parametrize("ties", [False, True])
def test_unbiased_weights_are_exact_at_moderate_k(ties):
    k = 2000
    rng = np.random.default_rng(4)
    reward = rng.integers(0, 300, k).astype(float) if ties else rng.permutation(k).astype(float)
    lt, le, kk = bon.empirical_counts(np.zeros(k), reward)
    for n in (1, 2, 7, 300, 1999, 2000):
        w = bon.unbiased_bon_weight(lt, le, kk, n)
        exact = np.array([exact_weight(int(a), int(b), k, n) for a, b in zip(lt, le)])
        np.testing.assert_allclose(w, exact, rtol=1e-10, atol=1e-300, err_msg=f"n={n}")


@pytest.mark.parametrize("n", [1, 2, 1000, 10**6])
def test_unbiased_weights_are_stable_at_a_million_samples(n):
    k = 10**6
    rng = np.random.default_rng(n)
    for reward in (rng.permutation(k).astype(float), rng.integers(0, 5000, k).astype(float)):  # no ties; ties
        lt, le, kk = bon.empirical_counts(np.zeros(k), reward)
        w = bon.unbiased_bon_weight(lt, le, kk, n)
        assert np.isfinite(w).all() and (w >= 0).all()
        assert w.sum() / k == pytest.approx(1.0, abs=1e-9)
        top = np.argsort(-w, kind="stable")[:3].tolist()
        middle = int(np.argsort(reward)[k // 2])
        for i in top + [middle]:  # the largest weights and a middle one, against integer math
            if n == k:
                exact = k / (le[i] - lt[i]) if le[i] == k else 0.0
            else:
                exact = exact_weight(int(lt[i]), int(le[i]), k, n)
            assert w[i] == pytest.approx(exact, rel=1e-10, abs=1e-300), (i, lt[i], le[i])


def test_effective_sample_size_and_tie_rate():
    group = np.array([0, 0, 0, 1, 1])
    assert bon.effective_sample_size(group, np.array([1.0, 1.0, 1.0, 2.0, 0.0])).tolist() == [3.0, 1.0]
    assert bon.tie_rate(group, np.array([1.0, 1.0, 2.0, 5.0, 6.0])) == pytest.approx(2 / 5)


def test_analytic_references_match_beta_simulation():
    rng = np.random.default_rng(2)
    n = 8
    q = rng.random((200_000, n)).max(axis=1)  # quantile of the best of n uniforms ~ Beta(n, 1)
    ref = bon.analytic_bon(n)
    assert q.mean() == pytest.approx(ref["mean_quantile"], abs=2e-3)
    assert np.log(q).mean() == pytest.approx(ref["mean_log_quantile"], abs=2e-3)
    # KL(Beta(n,1) || U(0,1)) = E[log(n q^(n-1))]
    assert np.mean(np.log(n) + (n - 1) * np.log(q)) == pytest.approx(ref["kl"], abs=1e-2)


def test_ks_distance_matches_a_fine_grid_and_detects_the_wrong_n():
    rng = np.random.default_rng(3)
    q = rng.random((4000, 4)).max(axis=1)  # Beta(4, 1)
    grid = np.linspace(0, 1, 20001)
    emp = np.searchsorted(np.sort(q), grid, side="right") / q.size
    brute = np.abs(emp - grid**4).max()
    assert bon.ks_distance_to_beta(q, 4) == pytest.approx(brute, abs=1e-3)
    assert bon.ks_distance_to_beta(q, 4) < 0.03 < 0.2 < bon.ks_distance_to_beta(q, 1)


def test_ks_to_uniform_by_hand():  # Uniform(0, 1) = Beta(1, 1)
    assert bon.ks_distance_to_beta([0.5], 1) == 0.5
    assert bon.ks_distance_to_beta([0.25, 0.75], 1) == 0.25
    assert bon.ks_distance_to_beta([0.0] * 10, 1) == 1.0
    grid = [(i + 0.5) / 1000 for i in range(1000)]
    assert bon.ks_distance_to_beta(grid, 1) == pytest.approx(0.0005)
    assert bon.ks_distance_to_beta([x * 0.5 for x in grid], 1) == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError):
        bon.ks_distance_to_beta([], 1)
