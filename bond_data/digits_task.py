"""The second built-in task: random digit strings with a *continuous* reward (almost no ties).

Why it exists: for a continuous reward the Best-of-N law is exact. The quantile (CDF value under
pi_0) of the best of N samples is Beta(N, 1), so E[p_le] = N/(N+1), E[log p_le] = -1/N and
KL(BoN || pi_0) = log N - (N-1)/N. The letter-sorting tiny task (bond_data.tiny_task) has a
discrete reward with many ties, where those formulas only hold approximately; this task lets a
fidelity benchmark compare BOND against them directly.

    prompt      "digits 3f9a:"             (a random 4-hex id; it only makes prompts distinct)
    completion  " 0372819465" + EOS        (10 digits, drawn i.i.d. uniform in the corpus)
    reward      0.0372819465               (the digits read as a decimal fraction, in [0, 1))

The model is tiny_task's (same byte-level tokenizer and 2-layer Llama, built with its
``build_tokenizer``/``build_model``), pretrained on a corpus whose digits are i.i.d. uniform and
independent of the prompt, so pi_0 samples near-uniform digit strings and the reward of one
sample is ~Uniform(0, 1), with 10^10 levels: two samples tie only when their strings are equal.
Best-of-N pushes the leading digits up, which a policy can learn (the optimum puts all its mass
on leading 9s).

Measured on the cached model (TASK_VERSION "1", seed 0, torch 2.13 CPU, the 2-core dev box while
busy with other work) with ``digits_stats`` (temperature 1.0, top_p 1.0, no top-k, max_new_tokens
16, 8 samples for each of the 32 held-out prompts; the 64 training prompts in brackets):

    pretraining                 25 s CPU, 35 s wall on the busy box, on one thread (400 steps of 64
                                examples; final loss 1.920 per token, the floor being
                                10 ln(10) / 12 = 1.919 for 10 uniform digits, a space and EOS);
                                ensure_digits_task() in a fresh process: 43 s with the imports
    well-formed completions     99.6 % [99.8 %]  (" " + exactly 10 digits + EOS; the misses hold a
                                stray non-digit byte); 99.4 % of 4096 held-out samples
    mean reward of one sample   0.495  [0.498]   (Uniform(0,1): 0.5)
    mean best-of-8 reward       0.922  [0.895]   (Uniform: 8/9 = 0.889, +- 0.018 over 32 pools)
    ties                        0 %    [0 %]     of the sample pairs within a pool (and of the
                                pools' best scores); 8.0 distinct completions of 8 per pool
    KS distance to Uniform(0,1) 0.041  [0.026]   of the 256 [512] one-sample rewards (5 % critical
                                value 0.085 [0.060]); on 16384 held-out samples (512 per prompt):
                                0.0055 (critical 0.0106), leading digits 0-9 each 9.5-10.5 %
    sampling (digits_stats)     about 2 s for 32 prompts x 8 samples, plus loading
    second ensure_digits_task() < 1 ms

(tests/bond_data/test_digits_task.py re-checks these with margins in its slow tests; run
``python -m bond_data.digits_task`` to build the cache and print the numbers.)
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

from bond_data.tiny_task import (
    TinyTask,
    build_model,
    build_tokenizer,
    default_cache_dir,
    ensure_built,
    pretrain_loop,
    read_prompts,
    write_prompt_split,
)

TASK_VERSION = "1"
PACKAGE_DIR = Path(__file__).resolve().parent
PROMPTS_FILE = PACKAGE_DIR / "digits_task_prompts.jsonl"
EVAL_PROMPTS_FILE = PACKAGE_DIR / "digits_task_eval_prompts.jsonl"
REWARD_SPEC = "bond_data.digits_task:reward"
MARKER = "digits_task.json"  # written last into a build folder: its presence means "complete"

N_DIGITS = 10  # digits of a completion; the reward reads at most this many
ID_HEX = 4  # hex digits of a prompt id
PRETRAIN_STEPS = 400
BATCH_SIZE = 64
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


def write_prompt_files(out_dir: Path = PACKAGE_DIR, seed: int = 4321, n_train: int = 64,
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
    import math

    warmup = max(1, steps // 20)
    return pretrain_loop(model, tokenizer, corpus_example, steps, LR,
                         lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))),
                         seed, progress, make_batch=_batch)


def _build_into(folder: Path, seed: int, quiet: bool) -> None:
    """Pretrain into folder/model (plain Hugging Face files), then write the folder/MARKER file."""
    import torch

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as tiny_task: faster on a busy CPU, same weights on any machine
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        if quiet:
            loss = pretrain(model, tokenizer, PRETRAIN_STEPS, seed=seed)
        else:
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                job = bar.add_task("pretraining the digits model", total=PRETRAIN_STEPS)
                loss = pretrain(model, tokenizer, PRETRAIN_STEPS, seed=seed,
                                progress=lambda s: bar.update(job, completed=s))
    finally:
        torch.set_num_threads(threads)
    meta = {"task_version": TASK_VERSION, "seed": seed, "steps": PRETRAIN_STEPS, "final_loss": loss,
            "pretrain_seconds": round(time.perf_counter() - start, 1),
            "pretrain_cpu_seconds": round(time.process_time() - cpu_start, 1)}
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


# ----------------------------------------------------------------------------- cache


def _task(folder: Path) -> TinyTask:
    return TinyTask(folder / "model", PROMPTS_FILE, EVAL_PROMPTS_FILE, REWARD_SPEC)


def ensure_digits_task(cache_dir: Path | None = None, *, quiet: bool = False, seed: int = 0) -> TinyTask:
    """The digits task, pretraining its model once into <cache>/digits-task-<TASK_VERSION>[-seed<k>].

    `cache_dir` defaults to tiny_task's (``$BOND_CACHE`` or ~/.cache/bond). Building takes about
    30 s on one CPU core; later calls only check the marker file.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    suffix = "" if seed == 0 else f"-seed{seed}"
    final = cache_dir / f"digits-task-{TASK_VERSION}{suffix}"
    announce = None if quiet else (
        f"Building the digits task model once (about 30 s on one CPU core) into {final}")
    ensure_built(final, MARKER, lambda tmp: _build_into(tmp, seed, quiet), announce)
    return _task(final)


# ----------------------------------------------------------------------------- measurement


def ks_uniform(values) -> float:
    """Kolmogorov-Smirnov distance sup |F_n(x) - x| between the sample and Uniform(0, 1)."""
    import numpy as np

    x = np.sort(np.clip(np.asarray(values, dtype=float), 0.0, 1.0))
    n = len(x)
    if n == 0:
        raise ValueError("ks_uniform needs at least one value")
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - x), np.max(x - (i - 1) / n)))


def sample_completions(model, tokenizer, prompts: list[str], n: int = 8, seed: int = 0,
                       max_new_tokens: int = 16, chunk: int = 64) -> list[list[str]]:
    """n completions for each prompt (ancestral sampling: temperature 1, no top-p/k), as text.

    Prompts go `chunk` at a time through one left-padded generate call (the shipped prompts all
    have the same length, so they need no padding).
    """
    import torch

    torch.manual_seed(seed)
    pools = []
    for start in range(0, len(prompts), chunk):
        enc = tokenizer(prompts[start:start + chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 num_return_sequences=n, max_new_tokens=max_new_tokens)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        pools += [texts[i:i + n] for i in range(0, len(texts), n)]
    return pools


def sample_stats(model, tokenizer, prompts: list[str], n: int = 8, seed: int = 0,
                 max_new_tokens: int = 16) -> dict[str, float]:
    """Sample n completions per prompt and summarise how close pi_0's reward is to Uniform(0, 1).

    mean_one (uniform: 1/2), mean_best (best of n; uniform: n/(n+1)), well_formed (share of
    " " + N_DIGITS digits), distinct (completions per pool), tied_pair_rate (share of sample
    pairs within a pool with equal reward), best_tied_rate (pools whose best is shared) and
    ks_uniform (KS distance of all the per-sample rewards to Uniform(0, 1)).
    """
    pools = sample_completions(model, tokenizer, prompts, n, seed, max_new_tokens)
    one, best, distinct, tied_pairs, best_tied, well_formed, everything = [], [], [], [], [], [], []
    for prompt, texts in zip(prompts, pools):
        scores = reward([(prompt, t) for t in texts])
        everything += scores
        one.append(sum(scores) / n)
        best.append(max(scores))
        distinct.append(len(set(texts)))
        pairs = [(a, b) for i, a in enumerate(scores) for b in scores[i + 1:]]
        tied_pairs.append(sum(a == b for a, b in pairs) / max(1, len(pairs)))
        best_tied.append(float(scores.count(max(scores)) > 1))
        well_formed += [float(is_well_formed(t)) for t in texts]
    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    return {"mean_one": mean(one), "mean_best": mean(best), "well_formed": mean(well_formed),
            "distinct": mean(distinct), "tied_pair_rate": mean(tied_pairs),
            "best_tied_rate": mean(best_tied), "ks_uniform": ks_uniform(everything)}


def digits_stats(model_dir: Path, prompts: list[str], n: int = 8, seed: int = 0,
                 max_new_tokens: int = 16) -> dict[str, float]:
    """sample_stats on a saved model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return sample_stats(model, AutoTokenizer.from_pretrained(model_dir), prompts, n, seed, max_new_tokens)


if __name__ == "__main__":  # python -m bond_data.digits_task: build (or reuse) and print the numbers
    task = ensure_digits_task()
    print(json.loads((task.model_dir.parent / MARKER).read_text()))
    for name, path in (("held-out", task.eval_prompts_file), ("training", task.prompts_file)):
        print(name, digits_stats(task.model_dir, read_prompts(path)))
