"""Evaluation against pi_0's pool: the pool is built once and rebuilt when its inputs change, p_le
matches a naive count, KL(pi_0 || pi_0) is 0 and a perturbed policy's KL is positive, the analytic
Best-of-N row, and the plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from testutil import REWARD, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from bond_data import bon
from trainer import evaluate

WORDS = ["dbca", "hello", "kite", "lamp", "qwerty"]


@pytest.fixture(scope="module")
def eval_prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    return write_jsonl(folder / "eval_prompts.jsonl", [{"prompt": f"sort: {w} ="} for w in WORDS])


@pytest.fixture(scope="module")
def pool(tmp_path_factory, untrained_model, eval_prompts):
    """Built once for the module; tests that rebuild a pool use their own folder."""
    return evaluate.ensure_eval_pool(tmp_path_factory.mktemp("pool") / "eval", str(untrained_model),
                                     str(eval_prompts), REWARD, k=32, max_new_tokens=8)


@pytest.fixture(scope="module")
def perturbed_model(tmp_path_factory, untrained_model):
    """The untrained model with noise added to every weight: a policy that differs from pi_0."""
    model = AutoModelForCausalLM.from_pretrained(untrained_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("perturbed") / "tiny"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(untrained_model).save_pretrained(out)
    return out


def test_pool_is_built_once_and_rebuilt_when_its_inputs_change(tmp_path, untrained_model, eval_prompts,
                                                                 perturbed_model):
    def build(k, pi0=untrained_model):
        return evaluate.ensure_eval_pool(tmp_path / "eval", str(pi0), str(eval_prompts), REWARD, k=k, max_new_tokens=8)

    def meta():
        return json.loads((tmp_path / "eval" / "eval_pool.json").read_text())

    pool = build(8)
    first = pq.read_table(pool)
    assert pool == tmp_path / "eval" / "eval_pool.parquet"
    assert first.column_names == ["prompt", "completion", "reward"] and first.num_rows == 8 * len(WORDS)
    assert first.column("prompt").to_pylist()[::8] == [f"sort: {w} =" for w in WORDS]
    assert meta()["k"] == 8 and meta()["reward_spec"] == REWARD and len(meta()["pi0_hash"]) == 64

    mtime = pool.stat().st_mtime_ns
    assert build(8) == pool and pool.stat().st_mtime_ns == mtime  # reused, not rewritten

    assert build(12) == pool and pq.read_metadata(pool).num_rows == 12 * len(WORDS) and meta()["k"] == 12
    hash0 = meta()["pi0_hash"]
    build(12, perturbed_model)
    assert meta()["pi0_hash"] != hash0
    assert pq.read_table(build(8)).equals(first)  # back to the first arguments: the same samples again
    assert sorted(p.name for p in pool.parent.iterdir()) == ["eval_pool.json", "eval_pool.parquet"]  # no temp files


def test_quantile_against_pool_matches_a_naive_count():
    rng = np.random.default_rng(0)
    pool_rewards = rng.integers(0, 4, size=17).astype(float)  # many ties
    rewards = np.array([-1.0, 0.0, 1.0, 2.0, 3.0, 3.5])
    naive = [(sum(q <= r for q in pool_rewards) + 1) / (len(pool_rewards) + 1) for r in rewards]
    np.testing.assert_allclose(evaluate.quantile_against_pool(pool_rewards, rewards), naive)
    assert evaluate.quantile_against_pool(pool_rewards, np.array([-1.0]))[0] == 1 / 18  # alone: never 0
    assert evaluate.quantile_against_pool(pool_rewards, np.array([9.0]))[0] == 1.0


def test_pi0_against_itself(pool, untrained_model):
    m = evaluate.evaluate_policy(str(untrained_model), str(untrained_model), pool, REWARD,
                                 samples_per_prompt=16, max_new_tokens=8)
    assert set(m) == {"reward", "p_le", "log_p_le", "kl", "samples", "quantiles"}
    assert len(m["quantiles"]) == m["samples"]
    assert m["samples"] == 16 * len(WORDS)
    assert abs(m["kl"]) < 1e-3  # generation's log-probs and pi_0's forward pass agree
    assert 0 < m["p_le"] <= 1 and m["log_p_le"] <= 0 and math.isfinite(m["log_p_le"])
    # Same distribution as the pool, so p_le is about 1/2 plus half the tie probability (large
    # here: the reward has 4 levels). Its expectation, estimated leave-one-out on the pool itself:
    rows = pq.read_table(pool).to_pylist()
    loo = []
    for prompt in {r["prompt"] for r in rows}:
        rs = [r["reward"] for r in rows if r["prompt"] == prompt]
        loo += [(sum(q <= x for q in rs) - 1 + 1) / len(rs) for x in rs]  # the other k-1, plus itself
    assert abs(m["p_le"] - np.mean(loo)) < 0.12  # ~3.5 standard errors for 80 samples
    assert abs(m["reward"] - pq.read_table(pool).column("reward").to_numpy().mean()) < 0.5


def test_p_le_and_reward_match_a_naive_loop(pool, untrained_model, monkeypatch):
    """Recompute evaluate_policy's p_le and reward from its own samples with plain Python."""
    seen = []
    real = evaluate._rewards

    def spy(spec, pairs):
        out = real(spec, pairs)
        seen.extend(zip(pairs, out))
        return out

    monkeypatch.setattr(evaluate, "_rewards", spy)
    m = evaluate.evaluate_policy(str(untrained_model), str(untrained_model), pool, REWARD,
                                 samples_per_prompt=4, max_new_tokens=8)
    rows = pq.read_table(pool).to_pylist()
    p_le = []
    for (prompt, _), r in seen:
        pool_r = [row["reward"] for row in rows if row["prompt"] == prompt]
        p_le.append((sum(q <= r for q in pool_r) + 1) / (len(pool_r) + 1))
    assert len(seen) == m["samples"] == 4 * len(WORDS)
    assert m["p_le"] == pytest.approx(sum(p_le) / len(p_le))
    assert m["log_p_le"] == pytest.approx(sum(map(math.log, p_le)) / len(p_le))
    assert m["reward"] == pytest.approx(sum(r for _, r in seen) / len(seen))


class _SeedCapture:
    """A stand-in backend that records the seeds it is asked to sample with."""

    def generate(self, jobs, sampling):
        self.seeds = [s for job in jobs for s in job.seeds]
        return [[] for _ in jobs]


def test_policy_samples_use_seeds_distinct_from_the_pool():
    pool, policy = _SeedCapture(), _SeedCapture()
    evaluate._sample(pool, [f"p{i}" for i in range(5)], 64, 4, "pool", 0)
    evaluate._sample(policy, [f"p{i}" for i in range(5)], 64, 4, "eval", 0)
    assert len(set(pool.seeds)) == len(set(policy.seeds)) == 5 * 64 and not set(pool.seeds) & set(policy.seeds)


def test_a_different_policy_has_positive_kl(pool, untrained_model, perturbed_model):
    m = evaluate.evaluate_policy(str(perturbed_model), str(untrained_model), pool, REWARD,
                                 samples_per_prompt=8, max_new_tokens=8)
    assert m["kl"] > 0.1
    assert 0 < m["p_le"] <= 1


def test_analytic_row():
    assert evaluate.analytic_row(1) == {"N": 1, "p_le": 0.5, "log_p_le": -1.0, "kl": 0.0}
    row = evaluate.analytic_row(4)
    assert row["N"] == 4 and row["p_le"] == pytest.approx(0.8) and row["log_p_le"] == pytest.approx(-0.25)
    assert row["kl"] == pytest.approx(math.log(4) - 0.75)


def test_plot_writes_a_png(tmp_path):
    rows = [{"round": t, "reward": 0.7 + 0.05 * t, "p_le": 0.5 + 0.1 * t, "log_p_le": -1 / 2**t,
             "kl": 0.2 * t, "analytic": evaluate.analytic_row(2**t)} for t in range(3)]
    bon_rows = [{"N": 2**t, "kl": 0.19 * t, "p_le": 0.5 + 0.12 * t, "reward": 0.7 + 0.06 * t} for t in range(3)]
    out = evaluate.plot_reward_vs_kl(rows, tmp_path / "plots" / "rounds.png", n=2, bon=bon_rows)
    assert out == tmp_path / "plots" / "rounds.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["rounds.png"]  # the temp file was renamed


def test_best_of_n_sampling_keeps_the_best_of_each_group(pool, untrained_model):
    one = evaluate.evaluate_best_of_n(str(untrained_model), pool, REWARD, n=1, samples_per_prompt=16)
    four = evaluate.evaluate_best_of_n(str(untrained_model), pool, REWARD, n=4, samples_per_prompt=16)
    assert one["samples"] == 16 * len(WORDS) and four["samples"] == 4 * 16 * len(WORDS)
    assert four["p_le"] > one["p_le"] and four["reward"] > one["reward"]
    assert four["kl_analytic"] == pytest.approx(np.log(4) - 3 / 4) and len(four["quantiles"]) == 16 * len(WORDS)
    assert four["kl"] == pytest.approx(evaluate.bon_kl_on_pool(evaluate.read_pool(pool), 4))
    assert 0 < four["kl"] < four["kl_analytic"]  # this reward has ties: below the continuous value
    assert one["kl"] == pytest.approx(0.0, abs=1e-12)


# ---- Best-of-N measured on the task: exact KL with ties, KS ----------------------------------
def enumerate_bon(anchor: list[float], reward: list[float], n: int) -> list[float]:
    """Best-of-n by brute force: every n-tuple of draws, the first maximum kept."""
    import itertools

    out = [0.0] * len(anchor)
    for draws in itertools.product(range(len(anchor)), repeat=n):
        prob = math.prod(anchor[y] for y in draws)
        best = max(reward[y] for y in draws)
        out[next(y for y in draws if reward[y] == best)] += prob
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bon_kl_exact_matches_enumeration_with_ties(n):
    counts = [2, 1, 3, 1, 3, 2]  # pi_0(y) = count / 12; rewards with ties at 0.1 and 0.5
    reward = [0.1, 0.5, 0.5, 0.9, 0.1, 0.3]
    anchor = [c / sum(counts) for c in counts]
    bon_probs = enumerate_bon(anchor, reward, n)
    brute = sum(p * math.log(p / a) for p, a in zip(bon_probs, anchor) if p > 0)
    pool = np.repeat(reward, counts)  # a pool distributed exactly as pi_0's rewards
    assert evaluate.bon_kl_exact(np.random.default_rng(0).permutation(pool), n) == pytest.approx(brute, abs=1e-12)
    if n > 1:
        assert brute < math.log(n) - (n - 1) / n  # ties: below the continuous value


def test_bon_kl_exact_without_ties_is_the_analytic_value():
    rewards = np.random.default_rng(1).random(4096)
    for n in (2, 8):
        assert evaluate.bon_kl_exact(rewards, n) == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-4)
    pool = {"a": rewards[:2048], "b": np.repeat([0.0, 1.0], 1024)}  # prompt b: a coin, Best-of-8 ~ always 1
    want = (evaluate.bon_kl_exact(rewards[:2048], 8) + (1 - 0.5**8) * math.log((1 - 0.5**8) / 0.5)
            + 0.5**8 * math.log(0.5**8 / 0.5)) / 2
    assert evaluate.bon_kl_on_pool(pool, 8) == pytest.approx(want)


def test_ks_distance_matches_a_naive_sup_with_ties():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 6, 40).astype(float), rng.integers(1, 8, 25).astype(float)
    points = sorted(set(a) | set(b))
    naive = max(abs(sum(x <= t for x in a) / len(a) - sum(x <= t for x in b) / len(b)) for t in points)
    assert evaluate.ks_distance(a, b) == pytest.approx(naive)
    assert evaluate.ks_distance(a, a.copy()) == 0.0
    assert evaluate.ks_distance([0.0], [1.0]) == 1.0


def test_ks_noise_matches_monte_carlo():
    """The mean KS distance between two samples of one continuous law, by simulation."""
    rng = np.random.default_rng(3)
    sims = [evaluate.ks_distance(rng.random(400), rng.random(300)) for _ in range(400)]
    assert np.mean(sims) == pytest.approx(evaluate.ks_noise(400, 300), rel=0.08)
    one = [bon.ks_distance_to_beta(rng.random(500), 1) for _ in range(400)]
    assert np.mean(one) == pytest.approx(evaluate.ks_noise(500), rel=0.08)


def test_best_of_several_n_from_one_draw(pool, untrained_model):
    both = evaluate.evaluate_best_of_ns(str(untrained_model), pool, REWARD, [2, 4], samples_per_prompt=4)
    alone = evaluate.evaluate_best_of_n(str(untrained_model), pool, REWARD, 4, samples_per_prompt=4)
    assert both[4] == alone  # same draw (the largest n's), same figures
    assert both[2]["samples"] == 2 * 4 * len(WORDS) and len(both[2]["quantiles"]) == 4 * len(WORDS)
    assert both[2]["kl"] == pytest.approx(evaluate.bon_kl_on_pool(evaluate.read_pool(pool), 2))
