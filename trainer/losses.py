"""BOND losses as pure functions of per-sequence log-probabilities (torch tensors).

Every tensor is one row per pool sample `[B]`: rows are samples y_i ~ A (the round's anchor),
grouped k per prompt, each with two Best-of-N weights from the dataset (bond_data/bon.py), both
with sum_i w_i / k = 1 per prompt, and log A(y_i) (`target_logprob`, else `anchor_logprob`).
`logp_policy` is log pi(y_i) with gradient. Means over rows are means over prompts of the
per-prompt (1/k) sums, for equal k.

Which weight where: the forward term takes `weight` (`bon_weight`, by default the unbiased weights,
exact for Best-of-N of A but 0 below rank N); the backward term takes `weight_pool`
(`bon_weight_pool`, Best-of-N with replacement from the pool, never 0), because it needs log w
finite: an unbiased w = 0 would make pi_BoN = 0 there and force rho to 0 on most of the pool. The
price is a slightly weaker backward target when N is near k; with N << k the two agree.

- forward  KL(pi_BoN || pi) = const - E_{pi_BoN}[log pi]  ~  -(1/k) sum_i w_i log pi(y_i)
  (mode covering; paper eq. 9, with exact weights instead of one Best-of-N sample)
- backward KL(pi || pi_BoN) = E_pi[log pi - log A - log w]
  ~  (1/k) sum_i [rho_i (log rho_i - log w_i) - rho_i + w_i],   rho_i = pi(y_i) / A(y_i)
  (importance weights: the pool was drawn from A, not from pi; mode seeking). The `- rho + w`
  terms have zero mean under A (E_A[rho] = E_A[w] = 1), so the estimate is unchanged in
  expectation, but they matter on a finite pool: without them the minimiser over the pool is
  rho_i = w_i / e, i.e. the policy is rewarded for moving mass *off* the pool, where the estimator
  cannot see it (the plain estimator diverged in bench/fidelity.py). With them each term is a
  Bregman divergence, >= 0 and minimal exactly at rho_i = w_i: pi = pi_BoN on the pool.
  It still pays, early on, to move mass off the pool along a direction every pool sample shares
  (scaling every rho by c): from pi = A the estimate falls until c = exp(mean log w), about
  exp(-KL(A || pi_BoN)), e.g. e^-4.9 at N = 8. On `digits` that made 7% to 40% of the policy's
  samples malformed after one epoch, and 2% to 4% (pi_0: 0.5%) still after four, carrying most of
  the excess KL (bench/RESULTS.md, "Tracing the digits KL overshoot"). `self_normalize=True`
  divides rho by its mean over the rows, rho_i / mean_j rho_j (self-normalized importance
  sampling), so such a shift changes nothing; a pool distributed exactly as A gives the same value
  and gradient as before (mean rho = 1 there). It needs several rows per call.
- Jeffreys  J_beta = (1 - beta) forward + beta backward, plus gamma KL(pi || A), estimated the same
  way: (1/k) sum_i [rho_i log rho_i - rho_i + 1].

The forward term drops its constant (the BoN entropy), so it is a cross-entropy, not a KL value.

Online J-BOND (paper Algorithm 2, trainer/online.py) has its own surrogate, `jbond_loss`: the forward
term on a Best-of-2 anchor sample, and REINFORCE on the policy's fresh samples with the reward
`-log 16 * [r(y) < min(r(y'_1), r(y'_2))] - (log pi(y) - log anchor(y))` for the backward term.
"""

from __future__ import annotations

import math

import torch

LOG16 = math.log(16.0)


def forward_kl_loss(logp_policy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted NLL of the pool: -(1/k) sum_i w_i log pi(y_i), averaged over prompts."""
    return -(weight * logp_policy).mean()


def backward_kl_loss(logp_policy: torch.Tensor, logp_anchor: torch.Tensor, weight: torch.Tensor,
                     self_normalize: bool = False) -> torch.Tensor:
    """Importance-sampled KL(pi || pi_BoN) on the anchor's pool; self_normalize: rho / mean(rho)."""
    log_rho = logp_policy - logp_anchor  # [B]
    if self_normalize:  # log(rho_i / mean_j rho_j): a common shift of every log rho cancels
        log_rho = log_rho - (torch.logsumexp(log_rho, 0) - math.log(log_rho.numel()))
    rho = log_rho.exp()
    # w = 0 (a sample Best-of-N never picks, e.g. RS-SFT's losers): pi_BoN = 0 there, and the
    # term is +inf unless rho = 0; clamping log w keeps it finite and pushes rho to 0.
    log_w = weight.clamp(min=1e-30).log()
    return (rho * (log_rho - log_w) - rho + weight).mean()


def anchor_kl_loss(logp_policy: torch.Tensor, logp_anchor: torch.Tensor) -> torch.Tensor:
    """Importance-sampled KL(pi || A) on the anchor's pool: the regulariser gamma multiplies."""
    log_rho = logp_policy - logp_anchor
    rho = log_rho.exp()
    return (rho * log_rho - rho + 1).mean()


def jeffreys_loss(logp_policy: torch.Tensor, logp_anchor: torch.Tensor, weight: torch.Tensor,
                  beta: float, gamma: float = 0.0, weight_pool: torch.Tensor | None = None,
                  self_normalize: bool = False) -> dict[str, torch.Tensor]:
    """J_beta + gamma KL(pi || A), and each term (detached) for logging: the forward term with
    `weight`, the backward term with `weight_pool` (default: `weight`; see the module docstring),
    self-normalized over the rows if asked. A term whose coefficient is 0 stays out of the graph
    (0 * inf would be NaN)."""
    fwd = forward_kl_loss(logp_policy, weight)
    bwd = backward_kl_loss(logp_policy, logp_anchor, weight if weight_pool is None else weight_pool, self_normalize)
    reg = anchor_kl_loss(logp_policy, logp_anchor)
    loss = sum(c * term for c, term in ((1 - beta, fwd), (beta, bwd), (gamma, reg)) if c != 0)
    return {"loss": loss, "forward": fwd.detach(), "backward": bwd.detach(), "anchor_kl": reg.detach()}


# ---- online J-BOND (paper Algorithm 2) -------------------------------------------------------
def best_of_two(r_anchor1: torch.Tensor, r_anchor2: torch.Tensor) -> torch.Tensor:
    """[B] bool: True where y'_1 is the Best-of-2 sample (ties: the first wins)."""
    return r_anchor1 >= r_anchor2


def jbond_backward_reward(r_policy, r_anchor1, r_anchor2, logp_policy, logp_anchor) -> torch.Tensor:
    """R(y) = -log 16 * [r(y) < min(r(y'_1), r(y'_2))] - (log pi(y) - log anchor(y)), detached."""
    below = r_policy < torch.minimum(r_anchor1, r_anchor2)
    r_b = torch.where(below, -LOG16, 0.0).to(logp_policy.dtype)
    return (r_b - (logp_policy - logp_anchor)).detach()


def reinforce_loss(reward: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """-mean((R - mean R) * log pi(y)) with R a stop-gradient: its gradient is REINFORCE's."""
    advantage = (reward - reward.mean()).detach()
    return -(advantage * logp).mean()


def jbond_loss(logp_best: torch.Tensor, logp_policy: torch.Tensor, logp_anchor: torch.Tensor,
               r_policy: torch.Tensor, r_anchor1: torch.Tensor, r_anchor2: torch.Tensor,
               beta: float, gamma: float = 0.0) -> dict[str, torch.Tensor]:
    """The J-BOND surrogate ("loss", with gradient) and its terms (detached) for logging.

    logp_best: log pi of the Best-of-2 anchor samples; logp_policy / logp_anchor: log pi and
    log anchor of the policy samples; r_*: rewards of the policy and the two anchor samples."""
    forward = -logp_best.mean()
    reward = jbond_backward_reward(r_policy, r_anchor1, r_anchor2, logp_policy.detach(), logp_anchor)
    backward = reinforce_loss(reward, logp_policy)
    log_ratio = (logp_policy - logp_anchor).detach()
    anchor_kl = reinforce_loss(-log_ratio, logp_policy)
    loss = (1 - beta) * forward + beta * backward + gamma * anchor_kl
    return {"loss": loss, "forward": forward.detach(), "backward": backward.detach(),
            "anchor_kl": anchor_kl.detach(), "backward_reward": reward.mean(), "log_ratio": log_ratio.mean(),
            "below_both": (r_policy < torch.minimum(r_anchor1, r_anchor2)).float().mean()}


# ---- the baseline: REINFORCE with a KL penalty -----------------------------------------------
def reinforce_kl_loss(reward: torch.Tensor, logp_policy: torch.Tensor, logp_ref: torch.Tensor,
                      kl_coef: float) -> dict[str, torch.Tensor]:
    """REINFORCE on r - kl_coef * KL(pi || ref) with a leave-one-out baseline per prompt.

    All tensors are [B, S]: S >= 2 policy samples of each of B prompts. R = r - kl_coef *
    (log pi - log ref) (stop-gradient), advantage A_i = R_i - mean_{j != i} R_j over the prompt's
    other samples (unbiased: independent of y_i), loss = -mean(A * log pi). Its expected gradient
    is -grad (E_pi[r] - kl_coef * KL(pi || ref))."""
    if reward.dim() != 2 or reward.shape[1] < 2:
        raise ValueError(f"reinforce_kl_loss needs [B, S >= 2] tensors, got {tuple(reward.shape)}")
    log_ratio = (logp_policy - logp_ref).detach()  # [B, S]
    shaped = (reward - kl_coef * log_ratio).detach()  # [B, S]
    s = shaped.shape[1]
    advantage = shaped - (shaped.sum(1, keepdim=True) - shaped) / (s - 1)  # [B, S] leave-one-out
    loss = -(advantage * logp_policy).mean()
    return {"loss": loss, "kl_penalty": log_ratio.mean(), "shaped_reward": shaped.mean()}
