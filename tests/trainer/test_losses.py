"""Losses against naive loops, the backward gradient against an exact KL, and convergence to the
exact Best-of-n distribution of a categorical policy with tied rewards for beta in {0, 0.5, 1}."""

import numpy as np
import pytest
import torch

from bond_data import bon
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
    assert losses.sequence_logprobs(logits, labels, mask).tolist() == pytest.approx(ref, abs=1e-5)


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


def test_backward_gradient_equals_the_exact_kl_gradient():
    n = 3
    target = torch.tensor(exact_bon(ANCHOR.numpy(), REWARD, n))
    w_outcome = target / ANCHOR
    rows = torch.tensor([y for y, c in enumerate(COUNTS) for _ in range(c)])  # a pool distributed as A
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(theta, 0)
    est = losses.backward_kl_loss(logp[rows], ANCHOR.log()[rows], w_outcome[rows])
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
    w = bon.bon_weights(np.zeros(k), REWARD[ys], n)
    rows, weight = torch.tensor(ys), torch.tensor(w)
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.1)
    for _ in range(400):
        logp = torch.log_softmax(theta, 0)
        loss = losses.jeffreys_loss(logp[rows], ANCHOR.log()[rows], weight, beta=beta)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    pi = torch.softmax(theta.detach(), 0).numpy()
    target = exact_bon(ANCHOR.numpy(), REWARD, n)
    tv = 0.5 * np.abs(pi - target).sum()
    assert tv < 0.02, f"beta={beta}: TV {tv:.4f} between the trained policy {pi} and Best-of-{n} {target}"
