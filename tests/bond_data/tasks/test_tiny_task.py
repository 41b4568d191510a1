"""Tests for the built-in tiny task: reward, tokenizer, untrained model, cache, Best-of-N quality."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bond_data.tasks import common
from bond_data.tasks import tiny as tt


# ----------------------------------------------------------------------------- reward


def test_reward_gives_one_to_the_answer_and_less_to_mistakes():
    prompt = "sort: dbcae ="
    completions = [" abcde", "abcde", " abced", " abde", " abccde", " abcdz", " edcba", "", " 123"]
    scores = tt.reward([(prompt, c) for c in completions])
    assert scores[:2] == [1.0, 1.0]  # surrounding spaces do not matter
    assert all(0.0 <= s < 1.0 for s in scores[2:])
    assert scores[-2:] == [0.0, 0.0]
    assert len(set(scores)) >= 4  # several discrete levels, not pass/fail
    assert tt.reward([(prompt, c) for c in completions]) == scores  # deterministic


def test_reward_levels_are_discrete_so_pools_can_tie():
    prompt = "sort: hgfedcba ="
    one_mistake = [" abcdefgg", " bacdefgh", " abcdefg", " abcdefghh"]
    scores = tt.reward([(prompt, c) for c in one_mistake])
    assert scores[0] == scores[1]  # a replaced letter and a swap both cost one edit of 8


def test_reward_reads_only_the_first_line_and_templated_prompts():
    assert tt.score("sort: cab =", " abc\nsort: zz = zz") == 1.0
    assert tt.score("some system text\nsort: cab =", " abc") == 1.0
    with pytest.raises(ValueError, match="not a tiny-task prompt"):
        tt.score("what is 2+2?", " 4")


# ----------------------------------------------------------------------------- prompts


def test_shipped_prompt_files_match_the_recipe_and_do_not_overlap(tmp_path):
    train, held_out = tt.read_prompts(tt.PROMPTS_FILE), tt.read_prompts(tt.EVAL_PROMPTS_FILE)
    assert (len(train), len(held_out)) == (64, 32)
    assert len(set(train)) == 64 and not set(train) & set(held_out)
    assert all(tt.answer_for(p) for p in train + held_out)
    regenerated = tt.write_prompt_files(tmp_path)
    assert [p.read_text() for p in regenerated] == [
        tt.PROMPTS_FILE.read_text(), tt.EVAL_PROMPTS_FILE.read_text()]


def test_corpus_is_noisy_but_often_right():
    import random

    rng = random.Random(0)
    examples = [tt.corpus_example(rng) for _ in range(2000)]
    scores = tt.reward(examples)
    exact = sum(s == 1.0 for s in scores) / len(scores)
    assert 0.2 < exact < 0.5
    assert len(set(scores)) > 5


# ----------------------------------------------------------------------------- cache (no pretraining)


def _fake_build(folder: Path, seed: int, quiet: bool) -> None:
    common.save_untrained_model(folder / "model", seed)
    (folder / "tiny_task.json").write_text(json.dumps({"fake": True}))


def test_ensure_renames_into_place_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setattr(tt, "_build_into", _fake_build)
    task = tt.ensure_tiny_task(tmp_path, quiet=True)
    assert task.model_dir == tmp_path / f"tiny-task-{tt.TASK_VERSION}" / "model"
    assert task.reward == tt.REWARD_SPEC == "bond_data.tasks.tiny:reward"
    assert task.prompts_file == tt.PROMPTS_FILE and task.eval_prompts_file == tt.EVAL_PROMPTS_FILE
    assert [p.name for p in tmp_path.iterdir()] == [task.model_dir.parent.name]  # no temp left over

    monkeypatch.setattr(tt, "_build_into", lambda *a: pytest.fail("rebuilt a cached model"))
    assert tt.ensure_tiny_task(tmp_path, quiet=True) == task


# ----------------------------------------------------------------------------- the real build


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tt.ensure_tiny_task(tmp_path_factory.mktemp("cache"), quiet=True)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


@pytest.mark.slow
def test_ensure_tiny_task_builds_once_then_reuses(built):
    meta = json.loads((built.model_dir.parent / "tiny_task.json").read_text())
    assert meta["task_version"] == tt.TASK_VERSION and meta["steps"] == tt.PRETRAIN_STEPS
    before = _snapshot(built.model_dir)
    start = time.perf_counter()
    again = tt.ensure_tiny_task(built.model_dir.parent.parent, quiet=True)
    assert time.perf_counter() - start < 0.5
    assert again == built and _snapshot(built.model_dir) == before


@pytest.mark.slow
def test_best_of_8_clearly_beats_one_sample(built):
    stats = tt.best_of_n_stats(built.model_dir, tt.read_prompts(built.prompts_file), n=8)
    assert 0.5 < stats["mean_one"] < 0.9  # mediocre but not hopeless: room for BOND to climb
    assert stats["mean_best"] - stats["mean_one"] >= 0.15
    assert stats["distinct"] >= 4
    assert 0.0 < stats["tied_pair_rate"] < 0.6 and stats["all_tied_rate"] < 0.25


@pytest.mark.slow
def test_held_out_prompts_behave_like_training_prompts(built):
    stats = tt.best_of_n_stats(built.model_dir, tt.read_prompts(built.eval_prompts_file), n=8)
    assert stats["mean_best"] - stats["mean_one"] >= 0.15
