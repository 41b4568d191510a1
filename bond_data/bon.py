"""Quantiles and exact Best-of-N weights on an empirical reward distribution (pure numpy).

BOND Theorem 1 (Sessa et al. 2024, eq. 6): for a reference policy A and reward r,

    pi_BoN(y) = A(y) * sum_{i=1..N} p_le(y)^(N-i) * p_lt(y)^(i-1)
              = A(y) * (p_le^N - p_lt^N) / (p_le - p_lt)

with p_le(y) = P[r(y') <= r(y)] and p_lt(y) = P[r(y') < r(y)] under y' ~ A.

On a pool of k samples of one prompt, we take A to be the pool's empirical distribution (each
sample has mass 1/k, ties counted with the sample itself included). Then the Best-of-N
distribution over the pool, ties broken uniformly, gives sample i exactly probability w_i / k with

    w_i = (P_le^N - P_lt^N) / (P_le - P_lt).

Since P_le - P_lt >= 1/k > 0, there is no 0/0; the w_i / k of a prompt sum to 1 (a telescoping
sum over the distinct reward levels). This is the exact weight, where RAFT / ReST / TRL keep one
argmax per group.
"""

from __future__ import annotations

import numpy as np


def empirical_quantiles(group: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, the fraction of its group with reward < (p_lt) and <= (p_le) its own.

    `group` holds any integer or string group keys (one per sample), `reward` finite floats.
    Groups need not be contiguous. O(n log n): one sort on a (group, reward rank) key.
    """
    group = np.asarray(group)
    reward = np.asarray(reward, dtype=np.float64)
    if group.shape != reward.shape or reward.ndim != 1:
        raise ValueError(f"group and reward must be 1-D and of one length, got {group.shape} and {reward.shape}")
    if not np.all(np.isfinite(reward)):
        raise ValueError("rewards must be finite (NaN or infinite reward found)")
    _, gid = np.unique(group, return_inverse=True)
    _, level = np.unique(reward, return_inverse=True)  # dense rank of each reward
    key = gid.astype(np.int64) * (int(level.max(initial=0)) + 1) + level  # orders by (group, reward)
    order = np.argsort(key, kind="stable")
    key_sorted, g_sorted = key[order], gid[order]
    lt = np.searchsorted(key_sorted, key_sorted, side="left")
    le = np.searchsorted(key_sorted, key_sorted, side="right")
    start = np.searchsorted(g_sorted, g_sorted, side="left")
    size = np.searchsorted(g_sorted, g_sorted, side="right") - start
    p_lt, p_le = np.empty_like(reward), np.empty_like(reward)
    p_lt[order] = (lt - start) / size
    p_le[order] = (le - start) / size
    return p_lt, p_le


def bon_weight(p_lt: np.ndarray, p_le: np.ndarray, n: int) -> np.ndarray:
    """Exact Best-of-n weight (p_le^n - p_lt^n) / (p_le - p_lt) (Theorem 1, ties included).

    On a pool of k samples p_le - p_lt >= 1/k, so the difference quotient loses little precision.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p_lt = np.asarray(p_lt, dtype=np.float64)
    p_le = np.asarray(p_le, dtype=np.float64)
    if np.any(p_le <= p_lt):
        raise ValueError("p_le must be strictly greater than p_lt (the sample itself counts)")
    return (p_le**n - p_lt**n) / (p_le - p_lt)


def bon_weights(group: np.ndarray, reward: np.ndarray, n: int) -> np.ndarray:
    """Exact Best-of-n weights of every sample within its group's empirical distribution."""
    p_lt, p_le = empirical_quantiles(group, reward)
    return bon_weight(p_lt, p_le, n)


def effective_sample_size(group: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Kish effective sample size (sum w)^2 / sum w^2 of each group, in sorted group order."""
    _, gid = np.unique(np.asarray(group), return_inverse=True)
    weight = np.asarray(weight, dtype=np.float64)
    total = np.bincount(gid, weights=weight)
    square = np.bincount(gid, weights=weight**2)
    return total**2 / square


def tie_rate(group: np.ndarray, reward: np.ndarray) -> float:
    """Fraction of samples whose reward equals another sample's reward in the same group."""
    p_lt, p_le = empirical_quantiles(group, reward)
    _, gid, counts = np.unique(np.asarray(group), return_inverse=True, return_counts=True)
    tied = (p_le - p_lt) * counts[gid] > 1.5  # more than the sample itself at its level
    return float(tied.mean()) if tied.size else 0.0


def analytic_bon(n: int) -> dict[str, float]:
    """Best-of-n references for continuous rewards: the quantile of a BoN sample is Beta(n, 1)."""
    return {
        "mean_quantile": n / (n + 1),
        "mean_log_quantile": -1.0 / n,
        "kl": float(np.log(n) - (n - 1) / n),
    }


def ks_distance_to_beta(quantiles: np.ndarray, n: int) -> float:
    """Kolmogorov-Smirnov distance sup_q |F_emp(q) - q^n| between sampled quantiles and Beta(n, 1),
    the law of a Best-of-n sample's quantile under a continuous reward."""
    q = np.sort(np.asarray(quantiles, dtype=np.float64))
    if q.size == 0:
        raise ValueError("no quantiles")
    cdf = q**n
    above = np.arange(1, q.size + 1) / q.size - cdf  # F_emp just after each point
    below = cdf - np.arange(0, q.size) / q.size  # F_emp just before it
    return float(max(above.max(), below.max()))
