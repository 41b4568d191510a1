"""Quantiles against sorting, BoN weights against Monte Carlo Best-of-n selection."""

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
def test_bon_weights_match_monte_carlo_selection(reward, n):
    reward = np.array(reward)
    k = len(reward)
    w = bon.bon_weights(np.zeros(k), reward, n)
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
