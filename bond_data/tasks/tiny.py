"""The built-in tiny task: letter sorting, a verifiable reward with spread and ties.

Why it exists: the demo and the end-to-end tests need a policy and a *real* reward without
downloading anything.

    prompt      "sort: dbca ="        (a word of 4-7 letters from a-j, repeats allowed)
    completion  " abcd" + EOS          (the letters in alphabetical order)
    reward      1 - edit_distance(completion, answer) / max(len)

The model (tasks/common.py: a 2-layer Llama, hidden size 64, byte-level tokenizer) is pretrained on
a *noisy* corpus: only P_CORRECT of the answers are right, the rest carry 1-3 corruptions (adjacent
swap, dropped, duplicated or replaced letter). So it samples varied completions, is mediocre but
not hopeless, and the right answer is in its support: Best-of-N is clearly better than one sample.
The reward takes a handful of discrete values (k/5, k/6, ...), so ties within a pool are common
but not universal. Measured figures (reward of one sample and of Best-of-8, ties, build time):
bench/README.md, "The built-in tasks"; `python -m bond_data.tasks.tiny` prints them.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from bond_data.tasks.common import (
    TASKS_DIR,
    Task,
    build_into,
    cached_task_folder,
    ensure_built,
    pool_stats,
    pretrain_loop,
    read_prompts,
    sample_completions,
    write_prompt_split,
)

TASK_VERSION = "1"  # bump when the corpus or pretraining changes: a new cache folder
PROMPTS_FILE = TASKS_DIR / "tiny_prompts.jsonl"
EVAL_PROMPTS_FILE = TASKS_DIR / "tiny_eval_prompts.jsonl"
REWARD_SPEC = "bond_data.tasks.tiny:reward"
MARKER = "tiny_task.json"  # written last into a build folder: its presence means "complete"

LETTERS = "abcdefghij"
MIN_LEN, MAX_LEN = 4, 7
P_CORRECT = 0.25  # share of right answers in the pretraining corpus
PRETRAIN_STEPS = 600
_PROMPT_RE = re.compile(r"sort:\s*([a-z]+)\s*=")


# ----------------------------------------------------------------------------- task and reward


def make_prompt(word: str) -> str:
    return f"sort: {word} ="


def answer_for(prompt: str) -> str:
    """The correct completion's letters for a prompt (searched anywhere, so templated text works)."""
    match = _PROMPT_RE.search(prompt)
    if match is None:
        raise ValueError(f"not a tiny-task prompt (expected 'sort: <letters> ='): {prompt!r}")
    return "".join(sorted(match.group(1)))


def _edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insert, delete, replace or swap neighbours, cost 1 each."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def score(prompt: str, completion: str) -> float:
    """1 - normalised edit distance to the sorted letters: discrete levels, 1.0 only when exact.

    Only the first line counts, stripped of surrounding spaces, so the EOS-less tail a sampler
    may leave after a newline does not matter; extra or missing letters cost like wrong ones.
    """
    target = answer_for(prompt)
    lines = completion.strip().splitlines()
    guess = lines[0].strip() if lines else ""
    return 1.0 - _edit_distance(guess, target) / max(len(guess), len(target))


def reward(batch: list[tuple[str, str]]) -> list[float]:
    """(prompt text, completion text) pairs -> one float in [0, 1] each; pure, deterministic."""
    return [score(prompt, completion) for prompt, completion in batch]


# ----------------------------------------------------------------------------- data


def _random_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def _corrupt(answer: str, rng: random.Random) -> str:
    """One plausible mistake: adjacent swap, dropped, duplicated or replaced letter."""
    s, i = list(answer), rng.randrange(len(answer))
    kind = rng.choice(("swap", "drop", "dup", "replace"))
    if kind == "swap" and len(s) > 1:
        i = min(i, len(s) - 2)
        s[i], s[i + 1] = s[i + 1], s[i]
    elif kind == "drop" and len(s) > 1:
        del s[i]
    elif kind == "dup":
        s.insert(i, s[i])
    else:
        s[i] = rng.choice(LETTERS)
    return "".join(s)


def corpus_example(rng: random.Random) -> tuple[str, str]:
    """A (prompt, completion) pair of the noisy pretraining corpus."""
    word = _random_word(rng)
    answer = "".join(sorted(word))
    if rng.random() >= P_CORRECT:
        for _ in range(rng.choice((1, 1, 2, 3))):
            answer = _corrupt(answer, rng)
    return make_prompt(word), " " + answer


def write_prompt_files(out_dir: Path = TASKS_DIR, seed: int = 1234, n_train: int = 64,
                       n_eval: int = 32) -> tuple[Path, Path]:
    """(Re)generate the shipped prompt files; training and eval words never overlap."""
    paths = Path(out_dir) / PROMPTS_FILE.name, Path(out_dir) / EVAL_PROMPTS_FILE.name
    return write_prompt_split(paths, _random_word, make_prompt, seed, n_train, n_eval)


# ----------------------------------------------------------------------------- pretraining


def pretrain(model, tokenizer, steps: int, seed: int = 0, progress=None) -> float:
    """Letter-sorting pretraining: warm-up, then a linear decay to 10 % of the peak lr.

    `progress(step)` is called after each step (for a progress bar).
    """
    warmup = max(1, steps // 20)
    return pretrain_loop(model, tokenizer, corpus_example, steps, 5e-3,
                         lambda s: min((s + 1) / warmup, 1 - s / steps * 0.9), seed, progress)


# ----------------------------------------------------------------------------- cache


def _build_into(folder: Path, seed: int, quiet: bool) -> None:
    build_into(folder, MARKER, pretrain, PRETRAIN_STEPS, seed, "tiny task", quiet, {"task_version": TASK_VERSION})


def ensure_tiny_task(cache_dir: Path | None = None, *, quiet: bool = False, seed: int = 0) -> Task:
    """The tiny task, pretraining its model once into the cache (under a minute on one CPU core)."""
    final = cached_task_folder("tiny-task", TASK_VERSION, seed, cache_dir)
    announce = None if quiet else f"Building the tiny task model once (under a minute on one CPU core) into {final}"
    ensure_built(final, MARKER, lambda tmp: _build_into(tmp, seed, quiet), announce)
    return Task(final / "model", PROMPTS_FILE, EVAL_PROMPTS_FILE, REWARD_SPEC)


# ----------------------------------------------------------------------------- measurement


def best_of_n_stats(model_dir: Path, prompts: list[str], n: int = 8, seed: int = 0,
                    max_new_tokens: int = 16) -> dict[str, float]:
    """Sample n completions per prompt (temperature 1) and summarise what Best-of-N gains over one
    sample: mean_one, mean_best, distinct completions per pool and the tie rates (common.pool_stats)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pools = sample_completions(model, AutoTokenizer.from_pretrained(model_dir), prompts, n, seed, max_new_tokens)
    rewards = [reward([(p, t) for t in texts]) for p, texts in zip(prompts, pools)]
    return {**pool_stats(rewards), "distinct": sum(len(set(t)) for t in pools) / len(pools)}


if __name__ == "__main__":  # python -m bond_data.tasks.tiny: build (or reuse) and print the numbers
    task = ensure_tiny_task()
    print(json.loads((task.model_dir.parent / "tiny_task.json").read_text()))
    print(best_of_n_stats(task.model_dir, read_prompts(task.prompts_file)))
