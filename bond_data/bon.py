"""Quantiles and exact Best-of-N weights on an empirical reward distribution (pure numpy).

BOND Theorem 1 (Sessa et al. 2024, eq. 6): for a reference policy A and reward r,

    pi_BoN(y) = A(y) * sum_{i=1..N} p_le(y)^(N-i) * p_lt(y)^(i-1)
              = A(y) * (p_le^N - p_lt^N) / (p_le - p_lt)

with p_le(y) = P[r(y') <= r(y)] and p_lt(y) = P[r(y') < r(y)] under y' ~ A.

On a pool of k samples of one prompt, let le_i / lt_i count the pool rewards <= / < sample i's (the
sample itself included), P_le = le / k, P_lt = lt / k. Two weightings, both with sum_i w_i / k = 1
per prompt (so `mean(w * f)` over a prompt is a Best-of-N expectation):

- *unbiased* (the default): w_i = k (C(le_i, N) - C(lt_i, N)) / (C(k, N) (le_i - lt_i)), N <= k.
  w_i / k is the probability that sample i is the maximum of a uniformly random N-subset of the
  pool, ties split uniformly (the hockey-stick identity sums the ranks of i's level). It is a
  U-statistic, like the unbiased pass@k estimator: E_pool[(1/k) sum_i w_i f(y_i)] = E_{BoN of A}[f]
  exactly, ties included. It is 0 for samples ranked below N, so its log is -inf there.
- *pool*: w_i = (P_le^N - P_lt^N) / (P_le - P_lt), Theorem 1 on the pool's empirical distribution:
  exactly Best-of-N drawn *with replacement* from the pool. A weaker target than Best-of-N of A
  when N is not much smaller than k (continuous rewards, k = 16, N = 8: E[log p_le] = -0.159, as
  Best-of-6.3 would give, not -1/8), but never 0 (P_le - P_lt >= 1/k), so its log is safe inside
  the trainer's backward term.

RAFT / ReST / TRL keep one argmax per group instead.
"""

from __future__ import annotations

import numpy as np


def empirical_counts(group: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample, how many of its group have a reward < (lt) and <= (le) its own, and the group's
    size k (int64 arrays; the sample itself counts in le and k).

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
    start = np.searchsorted(g_sorted, g_sorted, side="left")
    lt, le, k = (np.empty(reward.shape, dtype=np.int64) for _ in range(3))
    lt[order] = np.searchsorted(key_sorted, key_sorted, side="left") - start
    le[order] = np.searchsorted(key_sorted, key_sorted, side="right") - start
    k[order] = np.searchsorted(g_sorted, g_sorted, side="right") - start
    return lt, le, k


def empirical_quantiles(group: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, the fraction of its group with reward < (p_lt) and <= (p_le) its own."""
    lt, le, k = empirical_counts(group, reward)
    return lt / k, le / k


def bon_weight(p_lt: np.ndarray, p_le: np.ndarray, n: int) -> np.ndarray:
    """Pool Best-of-n weight (p_le^n - p_lt^n) / (p_le - p_lt) (Theorem 1, ties included): exact
    for Best-of-n drawn with replacement from the pool, and never 0.

    On a pool of k samples p_le - p_lt >= 1/k, so the difference quotient loses little precision.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p_lt = np.asarray(p_lt, dtype=np.float64)
    p_le = np.asarray(p_le, dtype=np.float64)
    if np.any(p_le <= p_lt):
        raise ValueError("p_le must be strictly greater than p_lt (the sample itself counts)")
    return (p_le**n - p_lt**n) / (p_le - p_lt)


def unbiased_bon_weight(lt: np.ndarray, le: np.ndarray, k: np.ndarray, n: int) -> np.ndarray:
    """Unbiased Best-of-n weight k (C(le, n) - C(lt, n)) / (C(k, n) (le - lt)) from the counts of a
    pool of size k (n <= k; ties included; 0 for samples ranked below n).

    Computed without cancellation or huge numbers, for k up to 10^6 and n up to k: by the
    hockey-stick identity C(le, n) - C(lt, n) = sum_{m=lt+1..le} C(m-1, n-1), so

        w = (n / (le - lt)) * sum_{m=lt+1..le} t_m,    t_m = C(m-1, n-1) / C(k-1, n-1) in [0, 1],

    where t_m (rank m the maximum of an n-subset, up to n/k) is a running sum of log1p terms from
    the top rank down (accurate where the weights are large). One table per distinct pool size.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    lt, le, k = (a.astype(np.int64) for a in np.broadcast_arrays(np.asarray(lt), np.asarray(le), np.asarray(k)))
    if np.any((lt < 0) | (le <= lt) | (le > k)):
        raise ValueError("counts must satisfy 0 <= lt < le <= k (the sample itself counts)")
    if k.size and n > k.min():
        raise ValueError(f"unbiased Best-of-{n} weights need n <= k, but a pool has only k = {k.min()} samples: "
                         f"raise k (generate more samples per prompt) or choose weighting 'pool'")
    w = np.empty(k.shape, dtype=np.float64)
    for size in np.unique(k):
        at = k == size
        t = _rank_terms(int(size), n)  # [size + 1]
        run = np.cumsum(t)  # run[a] = sum_{m <= a} t_m
        a, b = le[at], lt[at]
        single = n * t[a]  # no tie: one term, no subtraction
        level = n * (run[a] - run[b]) / (a - b)
        w[at] = np.where(a - b == 1, single, level)
    return w


def _rank_terms(k: int, n: int) -> np.ndarray:
    """t[m] = C(m-1, n-1) / C(k-1, n-1) for m = 1..k (t[0] = 0): log t[m] is the sum over
    j = m..k-1 of log1p(-(n-1)/j), and -inf (t = 0) below rank n."""
    j = np.arange(1, k, dtype=np.float64)  # [k - 1]
    terms = np.where(j > n - 1, np.log1p(-(n - 1) / np.maximum(j, n)), 0.0)
    log_t = np.append(np.cumsum(terms[::-1])[::-1], 0.0)  # log_t[m-1] = sum_{j >= m} terms, m = 1..k
    log_t[: n - 1] = -np.inf
    return np.concatenate([[0.0], np.exp(log_t)])


WEIGHTINGS = ("unbiased", "pool")


def bon_weights(group: np.ndarray, reward: np.ndarray, n: int, weighting: str = "unbiased") -> np.ndarray:
    """Best-of-n weights of every sample within its group: `unbiased` (needs n <= k) or `pool`."""
    lt, le, k = empirical_counts(group, reward)
    if weighting == "unbiased":
        return unbiased_bon_weight(lt, le, k, n)
    if weighting == "pool":
        return bon_weight(lt / k, le / k, n)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


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
