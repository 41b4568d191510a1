"""Tests for the digits task: continuous reward, prompts, cache, and a near-uniform pi_0."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from bond_data.bon import ks_distance_to_beta
from bond_data.tasks import common
from bond_data.tasks import digits as dt
from bond_data.tasks import tiny as tt

# ----------------------------------------------------------------------------- reward


def test_reward_reads_the_leading_digits_as_a_decimal_fraction():
    completions = [" 5", " 25x", "abc", " 9999999999", " 0372819465", "", "   ", " 12 34", "\n7\n",
                   " x25", " 0", " 0000000001"]
    scores = dt.reward([("digits 3f9a:", c) for c in completions])
    assert scores[:3] == [0.5, 0.25, 0.0]
    assert 0.9999999 < scores[3] < 1.0
    assert scores[4] == pytest.approx(0.0372819465, abs=1e-15)
    assert scores[5:8] == [0.0, 0.0, 0.12]  # empty, blank, only the first token counts
    assert scores[8] == 0.7  # any surrounding whitespace is stripped
    assert scores[9:11] == [0.0, 0.0]  # no leading digit; a lone zero
    assert 0.0 < scores[11] < 1e-9


def test_reward_is_deterministic_ignores_the_prompt_and_stays_below_one():
    batch = [("digits 0000:", " 314159"), ("any templated\ntext digits ffff:", " 314159"), ("", "271828")]
    assert dt.reward(batch) == dt.reward(batch) == [0.314159, 0.314159, 0.271828]
    # At most N_DIGITS digits are read, so longer strings cannot reach 1.0 or beat their prefix.
    assert dt.score(" " + "9" * 30) == dt.score(" " + "9" * dt.N_DIGITS) < 1.0
    assert dt.score(" 12345678901") == dt.score(" 1234567890")
    assert dt.score(" ²3") == 0.0 and dt.score(" ٣") == 0.0  # ASCII digits only
    assert dt.reward([]) == []


def test_distinct_strings_give_distinct_rewards():
    rng = random.Random(0)
    texts = {" " + "".join(rng.choice("0123456789") for _ in range(dt.N_DIGITS)) for _ in range(5000)}
    scores = dt.reward([("digits 0000:", t) for t in texts])
    assert len(set(scores)) == len(texts)  # 10^10 levels: ties only for identical strings
    assert all(0.0 <= s < 1.0 for s in scores)


def test_well_formed_is_the_corpus_format():
    assert dt.is_well_formed(" 0123456789")
    for bad in ["0123456789", " 012345678", " 01234567890", " 01234x6789", " 0123456789\n", ""]:
        assert not dt.is_well_formed(bad), bad


def test_corpus_rewards_are_uniform_and_well_formed():
    rng = random.Random(0)
    examples = [dt.corpus_example(rng) for _ in range(4000)]
    assert all(p.startswith("digits ") and p.endswith(":") and dt.is_well_formed(c) for p, c in examples)
    scores = dt.reward(examples)
    assert ks_distance_to_beta(scores, 1) < 0.03  # 5 % critical value for 4000 samples: 0.0215
    assert abs(sum(scores) / len(scores) - 0.5) < 0.02


# ----------------------------------------------------------------------------- prompts


def test_shipped_prompt_files_match_the_recipe_and_do_not_overlap(tmp_path):
    train, held_out = dt.read_prompts(dt.PROMPTS_FILE), dt.read_prompts(dt.EVAL_PROMPTS_FILE)
    assert (len(train), len(held_out)) == (64, 32)
    assert len(set(train)) == 64 and len(set(held_out)) == 32 and not set(train) & set(held_out)
    hex_digits = set("0123456789abcdef")
    for prompt in train + held_out:
        task_id = prompt.removeprefix("digits ").removesuffix(":")
        assert prompt == dt.make_prompt(task_id) and len(task_id) == 4 and set(task_id) <= hex_digits
    regenerated = dt.write_prompt_files(tmp_path)
    assert [p.read_text() for p in regenerated] == [
        dt.PROMPTS_FILE.read_text(), dt.EVAL_PROMPTS_FILE.read_text()]
    assert not set(train) & set(tt.read_prompts(tt.PROMPTS_FILE))  # not the tiny task's prompts


def test_prompts_render_unchanged_through_the_chat_template():
    tok = common.build_tokenizer()
    messages = [{"role": "user", "content": "digits 3f9a:"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == "digits 3f9a:"


def test_pretraining_batches_mask_the_prompt():
    tok = common.build_tokenizer()
    rng = random.Random(0)
    ids, labels = dt._batch(tok, [dt.corpus_example(rng) for _ in range(3)])
    assert ids.shape == labels.shape == (3, len("digits 3f9a:") + 1 + dt.N_DIGITS + 1)
    assert (labels[:, : len("digits 3f9a:")] == -100).all()
    assert (labels[:, -1] == tok.eos_token_id).all()
    assert tok.decode(labels[0, len("digits 3f9a:"):-1].tolist()).startswith(" ")


# ----------------------------------------------------------------------------- cache (no pretraining)


def _fake_build(folder: Path, seed: int, quiet: bool) -> None:
    common.save_untrained_model(folder / "model", seed)
    (folder / dt.MARKER).write_text(json.dumps({"fake": True}))


def test_ensure_renames_into_place_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setattr(dt, "_build_into", _fake_build)
    task = dt.ensure_digits_task(tmp_path, quiet=True)
    assert isinstance(task, common.Task)
    assert task.model_dir == tmp_path / f"digits-task-{dt.TASK_VERSION}" / "model"
    assert task.reward == dt.REWARD_SPEC == "bond_data.tasks.digits:reward"
    assert task.prompts_file == dt.PROMPTS_FILE and task.eval_prompts_file == dt.EVAL_PROMPTS_FILE
    assert [p.name for p in tmp_path.iterdir()] == [task.model_dir.parent.name]  # no temp left over

    monkeypatch.setattr(dt, "_build_into", lambda *a: pytest.fail("rebuilt a cached model"))
    assert dt.ensure_digits_task(tmp_path, quiet=True) == task


def test_seeds_and_the_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(dt, "_build_into", _fake_build)
    monkeypatch.setenv("BOND_CACHE", str(tmp_path))
    task = dt.ensure_digits_task(quiet=True, seed=3)
    assert task.model_dir == tmp_path / f"digits-task-{dt.TASK_VERSION}-seed3" / "model"


def test_sample_stats_on_an_untrained_model(untrained_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(untrained_model).eval()
    tok = AutoTokenizer.from_pretrained(untrained_model)
    prompts = ["digits 0001:", "digits 1:", "digits ab:"]  # mixed lengths: left padding
    for chunk in (1, 2, 64):
        pools = common.sample_completions(model, tok, prompts, n=3, max_new_tokens=4, chunk=chunk)
        assert [len(p) for p in pools] == [3, 3, 3]
    stats = dt.sample_stats(model, tok, prompts, n=4, max_new_tokens=4)
    assert set(stats) == {"mean_one", "mean_best", "well_formed", "distinct", "tied_pair_rate",
                          "all_tied_rate", "best_tied_rate", "ks_uniform"}
    assert stats["well_formed"] == 0.0  # 4 tokens cannot hold " " + 10 digits


# ----------------------------------------------------------------------------- the real build


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return dt.ensure_digits_task(tmp_path_factory.mktemp("cache"), quiet=True)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


@pytest.mark.slow
def test_ensure_digits_task_builds_once_then_reuses(built):
    meta = json.loads((built.model_dir.parent / dt.MARKER).read_text())
    assert meta["task_version"] == dt.TASK_VERSION and meta["steps"] == dt.PRETRAIN_STEPS
    assert meta["final_loss"] < 2.0  # the floor is 10 ln(10) / 12 = 1.92 per token
    before = _snapshot(built.model_dir)
    start = time.perf_counter()
    again = dt.ensure_digits_task(built.model_dir.parent.parent, quiet=True)
    assert time.perf_counter() - start < 0.5
    assert again == built and _snapshot(built.model_dir) == before


@pytest.mark.slow
@pytest.mark.parametrize("which", ["eval_prompts_file", "prompts_file"])
def test_samples_are_well_formed_tie_free_and_near_uniform(built, which):
    prompts = dt.read_prompts(getattr(built, which))
    stats = dt.digits_stats(built.model_dir, prompts, n=8)
    assert stats["well_formed"] >= 0.95
    assert stats["tied_pair_rate"] <= 0.01 and stats["best_tied_rate"] <= 0.05
    assert stats["distinct"] >= 7.9
    assert abs(stats["mean_one"] - 0.5) < 0.06
    assert abs(stats["mean_best"] - 8 / 9) < 0.05  # the Best-of-8 law for a uniform reward
    assert stats["ks_uniform"] < 1.63 / len(prompts * 8) ** 0.5  # the 1 % critical value
