"""Losses against naive loops, the backward gradient against an exact KL, convergence to the exact
Best-of-n distribution of a categorical policy with tied rewards for beta in {0, 0.5, 1}, and the
online J-BOND surrogate (reward rule with ties, REINFORCE, the weighted sum of its terms)."""

import math

import numpy as np
import pytest
import torch

from bond_data import bon
from bond_data.logprobs import sequence_logprobs
from trainer import losses


def pool(seed=0, k=6, prompts=3):
    g = torch.Generator().manual_seed(seed)
    logp_policy = -torch.rand(prompts * k, generator=g, dtype=torch.float64) * 5
    logp_anchor = -torch.rand(prompts * k, generator=g, dtype=torch.float64) * 5
    weight = torch.rand(prompts * k, generator=g, dtype=torch.float64) * 2 + 0.05
    return logp_policy, logp_anchor, weight, k, prompts


def test_losses_match_naive_loops():
    lp, la, w, k, prompts = pool()
    fwd = bwd = reg = 0.0
    for p in range(prompts):
        f = b = r = 0.0
        for i in range(p * k, (p + 1) * k):
            rho = float(np.exp(lp[i] - la[i]))
            f += -w[i].item() * lp[i].item()
            b += rho * (np.log(rho) - np.log(w[i].item())) - rho + w[i].item()
            r += rho * np.log(rho) - rho + 1
        fwd, bwd, reg = fwd + f / k / prompts, bwd + b / k / prompts, reg + r / k / prompts
    out = losses.jeffreys_loss(lp, la, w, beta=0.3, gamma=0.1)
    assert out["forward"].item() == pytest.approx(fwd)
    assert out["backward"].item() == pytest.approx(bwd)
    assert out["anchor_kl"].item() == pytest.approx(reg)
    assert out["loss"].item() == pytest.approx(0.7 * fwd + 0.3 * bwd + 0.1 * reg)


def test_the_backward_term_takes_the_pool_weight_inside_its_log():
    """Forward with the unbiased weights (zeros below rank N), backward with the pool weights: a
    naive loop over each prompt's pool."""
    k, n, prompts = 8, 5, 3
    rng = np.random.default_rng(5)
    reward = rng.integers(0, 4, prompts * k).astype(float)  # ties
    group = np.repeat(np.arange(prompts), k)
    w = torch.tensor(bon.bon_weights(group, reward, n, "unbiased"))
    w_pool = torch.tensor(bon.bon_weights(group, reward, n, "pool"))
    assert (w == 0).any() and (w_pool > 0).all()
    lp, la = -torch.rand(prompts * k, dtype=torch.float64) * 3, -torch.rand(prompts * k, dtype=torch.float64) * 3
    fwd = bwd = 0.0
    for i in range(prompts * k):
        rho = math.exp(lp[i] - la[i])
        fwd += -float(w[i]) * float(lp[i]) / (prompts * k)
        bwd += (rho * (math.log(rho) - math.log(float(w_pool[i]))) - rho + float(w_pool[i])) / (prompts * k)
    out = losses.jeffreys_loss(lp, la, w, beta=0.4, weight_pool=w_pool)
    assert out["forward"].item() == pytest.approx(fwd) and out["backward"].item() == pytest.approx(bwd)
    assert out["loss"].item() == pytest.approx(0.6 * fwd + 0.4 * bwd)
    same = losses.jeffreys_loss(lp, la, w, beta=0.4)  # no pool weight: the one weight in both terms
    assert same["backward"].item() == pytest.approx(losses.backward_kl_loss(lp, la, w).item())
    assert same["backward"].item() > out["backward"].item() + 1  # log of a clamped 0 is huge


def test_zero_weights_and_zero_coefficients_stay_finite():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    out = losses.jeffreys_loss(lp, torch.tensor([-1.5, -1.5]), torch.tensor([2.0, 0.0]), beta=0.0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(lp.grad).all()  # RS-SFT-style weights, beta 0


def test_backward_estimator_is_minimal_at_the_best_of_n_weights():
    """Per pool sample the backward term is minimised at rho = w, not at a smaller total mass."""
    weight = torch.tensor([0.5, 1.5], dtype=torch.float64)
    log_rho = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_rho], lr=0.05)
    for _ in range(2000):
        loss = losses.backward_kl_loss(log_rho, torch.zeros(2, dtype=torch.float64), weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(log_rho.detach().exp(), weight, atol=1e-3, rtol=0)


def test_sequence_logprobs_match_a_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g)
    labels = torch.randint(0, 7, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)
    ref = [sum(torch.log_softmax(logits[b, t], -1)[labels[b, t]].item() for t in range(4) if mask[b, t])
           for b in range(2)]
    assert sequence_logprobs(logits, labels, mask).tolist() == pytest.approx(ref, abs=1e-5)


# A categorical "policy" over 4 outcomes with rational anchor probabilities, so a pool holding each
# outcome in proportion to A makes the importance-sampled estimator equal the exact expectation.
ANCHOR = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
COUNTS = [1, 2, 3, 4]
REWARD = np.array([0.0, 1.0, 1.0, 2.0])  # outcomes 1 and 2 tie


def exact_bon(anchor: np.ndarray, reward: np.ndarray, n: int) -> np.ndarray:
    """Theorem 1 on the true distribution: pi_BoN(y) = A(y) (p_le^n - p_lt^n) / (p_le - p_lt)."""
    p_le = np.array([anchor[reward <= r].sum() for r in reward])
    p_lt = np.array([anchor[reward < r].sum() for r in reward])
    return anchor * bon.bon_weight(p_lt, p_le, n)


def test_self_normalized_backward_matches_a_naive_loop():
    lp, la, w, _, _ = pool(seed=3)
    rho = [math.exp(a - b) for a, b in zip(lp.tolist(), la.tolist())]
    mean = sum(rho) / len(rho)
    naive = sum(r / mean * (math.log(r / mean) - math.log(x)) - r / mean + x for r, x in zip(rho, w.tolist())) / len(rho)
    assert losses.backward_kl_loss(lp, la, w, self_normalize=True).item() == pytest.approx(naive)
    out = losses.jeffreys_loss(lp, la, w, beta=0.4, self_normalize=True)
    assert out["backward"].item() == pytest.approx(naive)


def test_self_normalized_backward_gains_nothing_from_moving_mass_off_the_pool():
    """From pi = A, lowering every rho alike (mass moved to sequences no pool holds) lowers the plain
    estimate, down to c = exp(mean log w); the self-normalized one does not move, and its gradient
    along that direction is 0."""
    _, la, w, _, _ = pool(seed=4)
    w = w * 0.2  # mean log w well below 0, as Best-of-N's pool weights
    for normalize in (False, True):
        at = {c: losses.backward_kl_loss(la + c, la, w, self_normalize=normalize).item() for c in (0.0, -1.0)}
        if normalize:
            assert at[-1.0] == pytest.approx(at[0.0])
        else:
            assert at[-1.0] < at[0.0] - 0.1
    shift = torch.zeros((), dtype=torch.float64, requires_grad=True)
    logp = (la + 0.3 * torch.randn(la.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).detach()
    (grad,) = torch.autograd.grad(losses.backward_kl_loss(logp + shift, la, w, self_normalize=True), shift)
    assert abs(grad.item()) < 1e-12


def test_self_normalized_backward_is_minimal_at_rho_proportional_to_w():
    weight = torch.tensor([0.5, 1.5, 3.0], dtype=torch.float64)
    log_rho = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_rho], lr=0.05)
    for _ in range(2000):
        loss = losses.backward_kl_loss(log_rho, torch.zeros(3, dtype=torch.float64), weight, self_normalize=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ratio = (log_rho.detach() - log_rho.detach()[0]).exp()
    torch.testing.assert_close(ratio, weight / weight[0], atol=1e-3, rtol=0)


def test_self_normalize_needs_several_rows_per_micro_batch():
    from trainer.config import TrainConfig

    with pytest.raises(ValueError, match="self_normalize"):
        TrainConfig(self_normalize=True, micro_batch_size=1)
    assert TrainConfig(self_normalize=True, micro_batch_size=2).self_normalize


@pytest.mark.parametrize("self_normalize", [False, True])
def test_backward_gradient_equals_the_exact_kl_gradient(self_normalize):
    """A pool distributed exactly as A: mean rho = 1, so the self-normalized estimate is the same."""
    n = 3
    target = torch.tensor(exact_bon(ANCHOR.numpy(), REWARD, n))
    w_outcome = target / ANCHOR
    rows = torch.tensor([y for y, c in enumerate(COUNTS) for _ in range(c)])  # a pool distributed as A
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(theta, 0)
    est = losses.backward_kl_loss(logp[rows], ANCHOR.log()[rows], w_outcome[rows], self_normalize)
    (g_est,) = torch.autograd.grad(est, theta)
    theta2 = theta.detach().clone().requires_grad_(True)
    pi = torch.softmax(theta2, 0)
    exact = (pi * (pi.log() - target.log())).sum()  # KL(pi || pi_BoN)
    (g_exact,) = torch.autograd.grad(exact, theta2)
    assert est.item() == pytest.approx(exact.item(), rel=1e-10)
    torch.testing.assert_close(g_est, g_exact)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_minimising_the_objective_converges_to_best_of_n(beta):
    """Large pool drawn from A, empirical BoN weights per Theorem 1 with ties; the minimiser of
    J_beta over a free categorical policy must be the exact Best-of-n distribution."""
    n, k = 4, 20_000
    rng = np.random.default_rng(0)
    ys = rng.choice(4, size=k, p=ANCHOR.numpy())
    w, w_pool = (bon.bon_weights(np.zeros(k), REWARD[ys], n, weighting) for weighting in ("unbiased", "pool"))
    rows, weight, weight_pool = torch.tensor(ys), torch.tensor(w), torch.tensor(w_pool)  # as the trainer reads them
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.1)
    for _ in range(400):
        logp = torch.log_softmax(theta, 0)
        loss = losses.jeffreys_loss(logp[rows], ANCHOR.log()[rows], weight, beta=beta, weight_pool=weight_pool)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    pi = torch.softmax(theta.detach(), 0).numpy()
    target = exact_bon(ANCHOR.numpy(), REWARD, n)
    tv = 0.5 * np.abs(pi - target).sum()
    assert tv < 0.02, f"beta={beta}: TV {tv:.4f} between the trained policy {pi} and Best-of-{n} {target}"


# ---- online J-BOND (paper Algorithm 2) -------------------------------------------------------
def test_backward_reward_matches_a_naive_loop_with_ties():
    g = torch.Generator().manual_seed(0)
    r_pol, r_a1, r_a2 = (torch.randint(0, 3, (200,), generator=g).float() for _ in range(3))  # many ties
    logp, logp_anchor = torch.randn(200, generator=g) * 3, torch.randn(200, generator=g) * 3
    got = losses.jbond_backward_reward(r_pol, r_a1, r_a2, logp, logp_anchor)
    for i in range(200):
        below = r_pol[i] < r_a1[i] and r_pol[i] < r_a2[i]
        want = (-math.log(16) if below else 0.0) - (logp[i] - logp_anchor[i])
        assert abs(float(got[i]) - float(want)) < 1e-5
    # the rule itself: strictly below the worse anchor sample; a tie with it is not penalised
    rule = losses.jbond_backward_reward(torch.tensor([0.0, 1.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 2.0, 1.0]),
                                        torch.tensor([2.0, 3.0, 1.0, 1.0]), torch.zeros(4), torch.zeros(4))
    assert torch.allclose(rule, torch.tensor([-math.log(16), 0.0, 0.0, 0.0]))
    assert not got.requires_grad and not losses.jbond_backward_reward(
        r_pol, r_a1, r_a2, logp.requires_grad_(), logp_anchor).requires_grad  # a stop-gradient


def test_best_of_two_prefers_the_first_on_ties():
    first = losses.best_of_two(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 1.0]))
    assert first.tolist() == [False, True, True]


def test_reinforce_surrogate_value_and_gradient_match_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    reward, logp = torch.randn(7, generator=g), torch.randn(7, generator=g).requires_grad_()
    loss = losses.reinforce_loss(reward, logp)
    loss.backward()
    mean = sum(float(r) for r in reward) / 7
    naive = sum(-(float(r) - mean) * float(lp) for r, lp in zip(reward, logp.detach())) / 7
    assert abs(float(loss.detach()) - naive) < 1e-5
    for i in range(7):  # d/d logp_i = -(R_i - mean R) / B: the baseline is a constant, R too
        assert abs(float(logp.grad[i]) + (float(reward[i]) - mean) / 7) < 1e-6


@pytest.mark.parametrize("beta,gamma", [(0.5, 0.0), (0.0, 0.0), (1.0, 0.3), (0.3, 2.0)])
def test_jbond_loss_gradient_is_the_weighted_sum_of_its_terms(beta, gamma):
    g = torch.Generator().manual_seed(2)
    best, pol = torch.randn(6, generator=g).requires_grad_(), torch.randn(6, generator=g).requires_grad_()
    anc = torch.randn(6, generator=g)
    r_pol, r_a1, r_a2 = (torch.randint(0, 3, (6,), generator=g).float() for _ in range(3))
    terms = losses.jbond_loss(best, pol, anc, r_pol, r_a1, r_a2, beta, gamma)
    terms["loss"].backward()
    lr = (pol - anc).detach()
    assert abs(float(terms["forward"]) + sum(float(x) for x in best.detach()) / 6) < 1e-6  # value, not only gradient
    reward = [(-math.log(16) if r_pol[i] < min(r_a1[i], r_a2[i]) else 0.0) - float(lr[i]) for i in range(6)]
    kl = [-float(lr[i]) for i in range(6)]
    for i in range(6):
        assert abs(float(best.grad[i]) + (1 - beta) / 6) < 1e-6  # forward: NLL of the Best-of-2 sample
        want = -beta * (reward[i] - sum(reward) / 6) / 6 - gamma * (kl[i] - sum(kl) / 6) / 6
        assert abs(float(pol.grad[i]) - want) < 1e-5
    assert abs(float(terms["log_ratio"]) - float(lr.mean())) < 1e-6
    assert abs(float(terms["below_both"]) - float((r_pol < torch.minimum(r_a1, r_a2)).float().mean())) < 1e-6


# ---- the baseline: REINFORCE with a KL penalty -----------------------------------------------
def test_reinforce_kl_loss_gradient_matches_a_naive_loop():
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_()
    ref, reward = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.rand(4, 3, generator=g, dtype=torch.float64)
    c = 0.3
    terms = losses.reinforce_kl_loss(reward, logp, ref, c)
    terms["loss"].backward()
    for b in range(4):
        shaped = [float(reward[b, i]) - c * (float(logp.detach()[b, i]) - float(ref[b, i])) for i in range(3)]
        for i in range(3):
            others = [shaped[j] for j in range(3) if j != i]
            advantage = shaped[i] - sum(others) / len(others)
            assert float(logp.grad[b, i]) == pytest.approx(-advantage / 12, abs=1e-12)
    assert float(terms["kl_penalty"]) == pytest.approx(float((logp.detach() - ref).mean()))
    with pytest.raises(ValueError, match="S >= 2"):
        losses.reinforce_kl_loss(reward[:, :1], logp[:, :1], ref[:, :1], c)


def test_reinforce_kl_expected_gradient_is_the_gradient_of_reward_minus_kl():
    """Enumerate every pair of samples of a categorical policy: the probability-weighted surrogate
    gradient equals the exact gradient of -(E_pi[r] - c KL(pi || ref))."""
    c = 0.5
    reward = torch.tensor([0.0, 1.0, 0.3, 0.7], dtype=torch.float64)
    ref = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=torch.float64)
    theta = torch.tensor([0.2, -0.1, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    pi = torch.softmax(theta, 0)
    (exact,) = torch.autograd.grad(-((pi * reward).sum() - c * (pi * (pi / ref).log()).sum()), theta)
    expected = torch.zeros(4, dtype=torch.float64)
    for y1 in range(4):
        for y2 in range(4):
            logp = torch.log_softmax(theta, 0)
            ys = torch.tensor([[y1, y2]])
            terms = losses.reinforce_kl_loss(reward[ys], logp[ys], ref.log()[ys], c)
            (grad,) = torch.autograd.grad(terms["loss"], theta)
            expected += float(pi[y1].detach() * pi[y2].detach()) * grad
    torch.testing.assert_close(expected, exact)
