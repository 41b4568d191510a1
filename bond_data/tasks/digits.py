"""The second built-in task: random digit strings with a *continuous* reward (almost no ties).

Why it exists: for a continuous reward the Best-of-N law is exact. The quantile (CDF value under
pi_0) of the best of N samples is Beta(N, 1), so E[p_le] = N/(N+1), E[log p_le] = -1/N and
KL(BoN || pi_0) = log N - (N-1)/N. The letter-sorting task (tasks/tiny.py) has a discrete reward
with many ties, where those formulas only hold approximately; this task lets the fidelity benchmark
compare BOND against them directly.

    prompt      "digits 3f9a:"             (a random 4-hex id; it only makes prompts distinct)
    completion  " 0372819465" + EOS        (10 digits, drawn i.i.d. uniform in the corpus)
    reward      0.0372819465               (the digits read as a decimal fraction, in [0, 1))

The model is the shared tiny Llama (tasks/common.py), pretrained on a corpus whose digits are
i.i.d. uniform and independent of the prompt, so pi_0 samples near-uniform digit strings and the
reward of one sample is ~Uniform(0, 1), with 10^10 levels: two samples tie only when their strings
are equal. Best-of-N pushes the leading digits up, which a policy can learn. Measured figures
(uniformity, Best-of-8, build time): bench/README.md, "The built-in tasks";
`python -m bond_data.tasks.digits` prints them.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from pathlib import Path

from bond_data.bon import ks_distance_to_beta
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
PROMPTS_FILE = TASKS_DIR / "digits_prompts.jsonl"
EVAL_PROMPTS_FILE = TASKS_DIR / "digits_eval_prompts.jsonl"
REWARD_SPEC = "bond_data.tasks.digits:reward"
MARKER = "digits_task.json"  # written last into a build folder: its presence means "complete"

N_DIGITS = 10  # digits of a completion; the reward reads at most this many
ID_HEX = 4  # hex digits of a prompt id
PRETRAIN_STEPS = 400
LR = 5e-3
_DIGITS_RE = re.compile(r"[0-9]*")  # ASCII only: str.isdigit would accept '²' or '٣'
_WELL_FORMED_RE = re.compile(rf" [0-9]{{{N_DIGITS}}}")


# ----------------------------------------------------------------------------- task and reward


def make_prompt(task_id: str) -> str:
    return f"digits {task_id}:"


def score(completion: str) -> float:
    """The completion's leading digits read as a decimal fraction: " 25x" -> 0.25, "abc" -> 0.0.

    Only the first whitespace-separated token counts; the number ends at its first non-digit
    (ASCII 0-9 only) and at most N_DIGITS digits are read, so the value lies in [0, 1 - 1e-10]
    and a longer string cannot beat its first N_DIGITS digits. No leading digit scores 0.0.
    """
    parts = completion.split()
    digits = _DIGITS_RE.match(parts[0]).group()[:N_DIGITS] if parts else ""
    return int(digits.ljust(N_DIGITS, "0")) / 10**N_DIGITS if digits else 0.0


def reward(batch: list[tuple[str, str]]) -> list[float]:
    """(prompt text, completion text) pairs -> one float in [0, 1) each; pure, deterministic.

    The prompt is ignored (its id carries no information), so templated prompts work too.
    """
    return [score(completion) for _, completion in batch]


def is_well_formed(completion: str) -> bool:
    """A space and exactly N_DIGITS ASCII digits, nothing else: the corpus format (EOS stripped)."""
    return _WELL_FORMED_RE.fullmatch(completion) is not None


# ----------------------------------------------------------------------------- data


def _random_id(rng: random.Random) -> str:
    return f"{rng.randrange(16**ID_HEX):0{ID_HEX}x}"


def corpus_example(rng: random.Random) -> tuple[str, str]:
    """A (prompt, completion) pair of the pretraining corpus: random id, i.i.d. uniform digits."""
    return make_prompt(_random_id(rng)), " " + "".join(rng.choice("0123456789") for _ in range(N_DIGITS))


def write_prompt_files(out_dir: Path = TASKS_DIR, seed: int = 4321, n_train: int = 64,
                       n_eval: int = 32) -> tuple[Path, Path]:
    """(Re)generate the shipped prompt files; training and eval ids never overlap."""
    paths = Path(out_dir) / PROMPTS_FILE.name, Path(out_dir) / EVAL_PROMPTS_FILE.name
    return write_prompt_split(paths, _random_id, make_prompt, seed, n_train, n_eval)


# ----------------------------------------------------------------------------- pretraining


def _batch(tokenizer, pairs: list[tuple[str, str]]):
    """Input ids and labels (loss on the completion and EOS only) for equal-length examples.

    Every corpus example has the same prompt and completion length (the byte-level tokenizer
    gives one token per character), so no padding and no attention mask are needed.
    """
    import torch

    prompts = tokenizer([p for p, _ in pairs])["input_ids"]
    answers = tokenizer([c for _, c in pairs])["input_ids"]
    rows = [p + c + [tokenizer.eos_token_id] for p, c in zip(prompts, answers)]
    if len({len(r) for r in rows}) != 1 or len({len(p) for p in prompts}) != 1:
        raise ValueError("digits-task batches need equal prompt and completion lengths")
    ids = torch.tensor(rows)
    labels = ids.clone()
    labels[:, : len(prompts[0])] = -100
    return ids, labels


def pretrain(model, tokenizer, steps: int, seed: int = 0,
             progress: Callable[[int], None] | None = None) -> float:
    """Next-token training on freshly sampled corpus batches; returns the final loss.

    Short warm-up, then a cosine decay to zero: the small final steps keep the gradient noise
    from leaving a tilt in the digit distribution, which matters here as the whole point is a
    near-uniform pi_0. `progress(step)` is called after each step.
    """
    warmup = max(1, steps // 20)
    return pretrain_loop(model, tokenizer, corpus_example, steps, LR,
                         lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))),
                         seed, progress, make_batch=_batch)


# ----------------------------------------------------------------------------- cache


def _build_into(folder: Path, seed: int, quiet: bool) -> None:
    build_into(folder, MARKER, pretrain, PRETRAIN_STEPS, seed, "digits", quiet, {"task_version": TASK_VERSION})


def ensure_digits_task(cache_dir: Path | None = None, *, quiet: bool = False, seed: int = 0) -> Task:
    """The digits task, pretraining its model once into <cache>/digits-task-<TASK_VERSION>[-seed<k>]
    (about 30 s on one CPU core); later calls only check the marker file."""
    final = cached_task_folder("digits-task", TASK_VERSION, seed, cache_dir)
    announce = None if quiet else f"Building the digits task model once (about 30 s on one CPU core) into {final}"
    ensure_built(final, MARKER, lambda tmp: _build_into(tmp, seed, quiet), announce)
    return Task(final / "model", PROMPTS_FILE, EVAL_PROMPTS_FILE, REWARD_SPEC)


# ----------------------------------------------------------------------------- measurement


def sample_stats(model, tokenizer, prompts: list[str], n: int = 8, seed: int = 0,
                 max_new_tokens: int = 16) -> dict[str, float]:
    """Sample n completions per prompt and summarise how close pi_0's reward is to Uniform(0, 1):
    common.pool_stats, plus well_formed (share of " " + N_DIGITS digits), distinct (completions per
    pool) and ks_uniform (KS distance of every per-sample reward to Uniform(0, 1) = Beta(1, 1))."""
    pools = sample_completions(model, tokenizer, prompts, n, seed, max_new_tokens)
    rewards = [reward([(p, t) for t in texts]) for p, texts in zip(prompts, pools)]
    texts = [t for pool in pools for t in pool]
    return {**pool_stats(rewards), "well_formed": sum(map(is_well_formed, texts)) / len(texts),
            "distinct": sum(len(set(pool)) for pool in pools) / len(pools),
            "ks_uniform": ks_distance_to_beta([r for pool in rewards for r in pool], 1)}


def digits_stats(model_dir: Path, prompts: list[str], n: int = 8, seed: int = 0,
                 max_new_tokens: int = 16) -> dict[str, float]:
    """sample_stats on a saved model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return sample_stats(model, AutoTokenizer.from_pretrained(model_dir), prompts, n, seed, max_new_tokens)


if __name__ == "__main__":  # python -m bond_data.tasks.digits: build (or reuse) and print the numbers
    task = ensure_digits_task()
    print(json.loads((task.model_dir.parent / MARKER).read_text()))
    for name, path in (("held-out", task.eval_prompts_file), ("training", task.prompts_file)):
        print(name, digits_stats(task.model_dir, read_prompts(path)))
