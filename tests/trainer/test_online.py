"""Online J-BOND (trainer/online.py): the loss pieces against naive loops, the EMA anchor, the
checkpoints, and a learning check on a reward an untrained model can climb in a few dozen steps."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bond_data.score import RewardError
from trainer import online
from trainer.anchor import ema_update
from trainer.checkpoints import is_complete
from trainer.online import OnlineConfig, train_online

PROMPTS = [f"sort: {w} =" for w in ["dbca", "zyx", "hello", "qwerty", "mno", "pqrs", "abc", "edcba", "kite", "lamp"]]


def lowercase(batch):
    """Reward for the learning check: lowercase ASCII letters in the completion (~10 % of an
    untrained byte-level model's tokens, so samples spread and the count can climb)."""
    return [float(sum("a" <= ch <= "z" for ch in c)) for _, c in batch]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model runs ~3x faster on one thread when the CPU is shared (see tiny_task._build_into)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the pure math ---------------------------------------------------------------------------
def test_backward_reward_matches_a_naive_loop_with_ties():
    g = torch.Generator().manual_seed(0)
    r_pol, r_a1, r_a2 = (torch.randint(0, 3, (200,), generator=g).float() for _ in range(3))  # many ties
    logp, logp_anchor = torch.randn(200, generator=g) * 3, torch.randn(200, generator=g) * 3
    got = online.jbond_backward_reward(r_pol, r_a1, r_a2, logp, logp_anchor)
    for i in range(200):
        below = r_pol[i] < r_a1[i] and r_pol[i] < r_a2[i]
        want = (-math.log(16) if below else 0.0) - (logp[i] - logp_anchor[i])
        assert abs(float(got[i]) - float(want)) < 1e-5
    # the rule itself: strictly below the worse anchor sample; a tie with it is not penalised
    rule = online.jbond_backward_reward(torch.tensor([0.0, 1.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 2.0, 1.0]),
                                        torch.tensor([2.0, 3.0, 1.0, 1.0]), torch.zeros(4), torch.zeros(4))
    assert torch.allclose(rule, torch.tensor([-math.log(16), 0.0, 0.0, 0.0]))
    assert not got.requires_grad and not online.jbond_backward_reward(
        r_pol, r_a1, r_a2, logp.requires_grad_(), logp_anchor).requires_grad  # a stop-gradient


def test_best_of_two_prefers_the_first_on_ties():
    first = online.best_of_two(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 1.0]))
    assert first.tolist() == [False, True, True]


def test_reinforce_surrogate_value_and_gradient_match_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    reward, logp = torch.randn(7, generator=g), torch.randn(7, generator=g).requires_grad_()
    loss = online.reinforce_loss(reward, logp)
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
    terms = online.jbond_loss(best, pol, anc, r_pol, r_a1, r_a2, beta, gamma)
    terms["loss"].backward()
    lr = (pol - anc).detach()
    reward = [(-math.log(16) if r_pol[i] < min(r_a1[i], r_a2[i]) else 0.0) - float(lr[i]) for i in range(6)]
    kl = [-float(lr[i]) for i in range(6)]
    for i in range(6):
        assert abs(float(best.grad[i]) + (1 - beta) / 6) < 1e-6  # forward: NLL of the Best-of-2 sample
        want = -beta * (reward[i] - sum(reward) / 6) / 6 - gamma * (kl[i] - sum(kl) / 6) / 6
        assert abs(float(pol.grad[i]) - want) < 1e-5
    assert abs(float(terms["log_ratio"]) - float(lr.mean())) < 1e-6
    assert abs(float(terms["below_both"]) - float((r_pol < torch.minimum(r_a1, r_a2)).float().mean())) < 1e-6


def test_ema_moves_tied_weights_once(untrained_model):
    policy = AutoModelForCausalLM.from_pretrained(untrained_model)
    anchor = copy.deepcopy(policy)
    start = anchor.lm_head.weight.detach().clone()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    ema_update(online._unaliased_state(anchor), policy.state_dict(), 0.5)
    assert anchor.lm_head.weight is anchor.model.embed_tokens.weight  # still tied
    assert torch.allclose(anchor.lm_head.weight, start + 0.5)  # not 0.75: one lerp, not two


def test_sample_seeds_are_distinct():
    seeds = {online.sample_seed(0, step, slot, slot % 3, role, s)
             for step in range(5) for slot in range(6) for role in ("policy", "anchor") for s in range(2)}
    assert len(seeds) == 5 * 6 * 2 * 2 and all(0 <= s < 2**63 for s in seeds)


# ---- the trainer -----------------------------------------------------------------------------
def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _small(**kw):
    return OnlineConfig(**{"steps": 3, "prompts_per_step": 4, "max_new_tokens": 4, "lr": 1e-2, **kw})


def test_train_online_writes_checkpoints_and_moves_the_ema_anchor(untrained_model, tmp_path):
    out = train_online(str(untrained_model), PROMPTS, "rewards_for_tests:letter_count", tmp_path / "run",
                       _small(eta=0.5), metrics_path=tmp_path / "metrics.jsonl")
    assert out["steps"] == 3 and out["samples_generated"] == 3 * 4 * 3
    assert {"loss", "forward", "backward", "anchor_kl", "backward_reward", "log_ratio", "reward_last"} <= set(out)
    assert is_complete(tmp_path / "run") and is_complete(tmp_path / "run" / "anchor")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run") is not None
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "anchor") is not None
    start, policy, anchor = (_weights(f) for f in (untrained_model, tmp_path / "run", tmp_path / "run" / "anchor"))
    assert any(not torch.equal(start[k], anchor[k]) for k in start)
    assert any(not torch.equal(policy[k], anchor[k]) for k in start)
    assert json.loads((tmp_path / "run" / "generation_config.json").read_text())["do_sample"]  # kept as loaded
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [1, 2, 3]
    assert abs(log[0]["log_ratio"]) < 1e-4  # the policy starts as the anchor
    assert {"reward", "below_both", "grad_norm", "forward", "backward", "anchor_kl", "log_ratio"} <= set(log[0])


def test_eta_zero_keeps_the_anchor_at_the_start(untrained_model, tmp_path):
    train_online(str(untrained_model), PROMPTS, "rewards_for_tests:letter_count", tmp_path / "run",
                 _small(eta=0.0, steps=2))
    start, policy, anchor = (_weights(f) for f in (untrained_model, tmp_path / "run", tmp_path / "run" / "anchor"))
    assert all(torch.equal(start[k], anchor[k]) for k in start)
    assert any(not torch.equal(start[k], policy[k]) for k in start)


def test_a_non_finite_reward_is_an_error(untrained_model, tmp_path):
    with pytest.raises(RewardError, match="nan"):
        train_online(str(untrained_model), PROMPTS, "rewards_for_tests:nan_on_third", tmp_path / "run",
                     _small(steps=1))


def test_online_jbond_climbs_the_reward(untrained_model, tmp_path):
    cfg = OnlineConfig(steps=30, prompts_per_step=8, max_new_tokens=6, lr=1e-2, eta=0.1, seed=0)
    out = train_online(str(untrained_model), PROMPTS, "test_online:lowercase", tmp_path / "run", cfg,
                       metrics_path=tmp_path / "metrics.jsonl")
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.5, f"mean reward of policy samples: first 5 steps {first:.2f}, last 5 {last:.2f}"
    assert out["reward_last"] == pytest.approx(last)
