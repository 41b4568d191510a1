"""Online J-BOND (trainer/online.py): the EMA anchor, the checkpoints, and a learning check on a
reward an untrained model can climb in a few dozen steps. Its loss is tested in test_losses.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bond_data.score import RewardError
from trainer.anchor import ema_state, ema_update
from trainer.checkpoints import is_complete
from trainer.config import OnlineConfig
from trainer.online import train_online

PROMPTS = [f"sort: {w} =" for w in ["dbca", "zyx", "hello", "qwerty", "mno", "pqrs", "abc", "edcba", "kite", "lamp"]]


def lowercase(batch):
    """Reward for the learning check: lowercase ASCII letters in the completion (~10 % of an
    untrained byte-level model's tokens, so samples spread and the count can climb)."""
    return [float(sum("a" <= ch <= "z" for ch in c)) for _, c in batch]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model runs ~3x faster on one thread when the CPU is shared (see tasks/common.build_into)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ema_moves_tied_weights_once(untrained_model):
    policy = AutoModelForCausalLM.from_pretrained(untrained_model)
    anchor = copy.deepcopy(policy)
    start = anchor.lm_head.weight.detach().clone()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    ema_update(ema_state(anchor), policy.state_dict(), 0.5)
    assert anchor.lm_head.weight is anchor.model.embed_tokens.weight  # still tied
    assert torch.allclose(anchor.lm_head.weight, start + 0.5)  # not 0.75: one lerp, not two


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


# ---- checkpoint / resume, REINFORCE ----------------------------------------------------------
class Crash(Exception):
    pass


def test_kill_and_resume_ends_where_an_uninterrupted_run_ends(untrained_model, tmp_path, monkeypatch):
    from trainer import online

    cfg = _small(steps=4, eta=0.3, checkpoint_every=2)
    whole = train_online(str(untrained_model), PROMPTS, "rewards_for_tests:letter_count", tmp_path / "whole", cfg,
                         metrics_path=tmp_path / "whole.jsonl")
    real_step = online._step

    def crash_on_step_3(run, prompts, batch, step, c):
        if step == 2:  # 0-based: steps 1 and 2 done and checkpointed, step 3 dies halfway
            raise Crash
        return real_step(run, prompts, batch, step, c)

    monkeypatch.setattr(online, "_step", crash_on_step_3)
    with pytest.raises(Crash):
        train_online(str(untrained_model), PROMPTS, "rewards_for_tests:letter_count", tmp_path / "cut", cfg,
                     metrics_path=tmp_path / "cut.jsonl")
    assert [p.name for p in (tmp_path / "cut-steps").iterdir()] == ["step-2"]
    monkeypatch.setattr(online, "_step", real_step)
    resumed = train_online(str(untrained_model), PROMPTS, "rewards_for_tests:letter_count", tmp_path / "cut", cfg,
                           metrics_path=tmp_path / "cut.jsonl")
    for part in ("", "anchor"):
        a, b = _weights(tmp_path / "whole" / part), _weights(tmp_path / "cut" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part or "policy"
    assert resumed["samples_generated"] == whole["samples_generated"] and resumed["loss"] == whole["loss"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "cut-steps").iterdir()) == ["step-2", "step-4"]  # keep_checkpoints=2
    with pytest.raises(ValueError, match="lr=0.01"):  # another config does not continue this run
        train_online(str(untrained_model), PROMPTS, "rewards_for_tests:letter_count", tmp_path / "cut",
                     _small(steps=6, eta=0.3, checkpoint_every=2, lr=1e-3))


def test_reinforce_baseline_keeps_its_reference_and_spends_the_same_budget(untrained_model, tmp_path):
    cfg = _small(algorithm="reinforce", kl_coef=0.1, steps=2, eta=0.5, keep_checkpoints=0, checkpoint_every=1)
    out = train_online(str(untrained_model), PROMPTS, "rewards_for_tests:letter_count", tmp_path / "run", cfg,
                       metrics_path=tmp_path / "metrics.jsonl")
    assert out["samples_generated"] == 2 * 4 * 3  # J-BOND's 1 + 2 samples per prompt, all from the policy
    start, policy, ref = (_weights(f) for f in (untrained_model, tmp_path / "run", tmp_path / "run" / "anchor"))
    assert all(torch.equal(start[k], ref[k]) for k in start)  # no EMA: the KL is to the starting policy
    assert any(not torch.equal(start[k], policy[k]) for k in start)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert abs(log[0]["kl_penalty"]) < 1e-4 and "shaped_reward" in log[0]
    assert sorted(p.name for p in (tmp_path / "run-steps").iterdir()) == ["step-1", "step-2"]
