"""The built-in tiny task: a small causal LM, built and pretrained in code, plus a verifiable reward.

Why it exists: the pipeline demo and the end-to-end tests need a policy and a *real* reward
without downloading anything. The task is letter sorting:

    prompt      "sort: dbca ="        (a word of 4-7 letters from a-j, repeats allowed)
    completion  " abcd" + EOS          (the letters in alphabetical order)

The model (a 2-layer Llama, hidden size 64, 148k parameters, byte-level tokenizer) is pretrained on a *noisy* corpus: only
P_CORRECT of the answers are right, the rest carry 1-3 corruptions (adjacent swap, dropped,
duplicated or replaced letter). So it samples varied completions, is mediocre but not
hopeless, and the right answer is in its support: Best-of-N is clearly better than one sample
and BOND can learn to climb towards it.

The reward is ``1 - edit_distance(completion, answer) / max(len)`` (each insertion, deletion,
replacement or swap of neighbours costs one edit), which takes a handful of
discrete values (k/5, k/6, ...), so ties within a pool of samples are common but not universal.

Measured on the cached model (TASK_VERSION "1", seed 0, torch 2.13 CPU, the 2-core dev box) with
``best_of_n_stats`` (temperature 1.0, top_p 1.0, no top-k, max_new_tokens 16, 8 samples for each
of the 64 training prompts; held-out prompts in brackets):

    pretraining                 42 s wall on one thread (600 steps of 64 examples, final loss 0.75);
                                torch.set_num_threads(2) gives the same weights, ~15 % faster on an
                                idle box but 75 s with light background load: see _build_into
    mean reward of one sample   0.744   [0.781]
    mean best-of-8 reward       0.964   [0.983]   -> +0.22 for Best-of-8
    distinct completions        7.1 of 8 per prompt   [6.6]
    ties                        18 % of the sample pairs within a pool score the same,
                                the best score is shared in 61 % [63 %] of pools, none is all tied
    second ensure_tiny_task()   < 1 ms (plus ~50 ms to import this module)

(tests/bond_data/test_tiny_task.py re-checks these with margins in its slow tests.)
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy: `bond --help` should not import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

TASK_VERSION = "1"
PACKAGE_DIR = Path(__file__).resolve().parent
PROMPTS_FILE = PACKAGE_DIR / "tiny_task_prompts.jsonl"
EVAL_PROMPTS_FILE = PACKAGE_DIR / "tiny_task_eval_prompts.jsonl"
REWARD_SPEC = "bond_data.tiny_task:reward"

LETTERS = "abcdefghij"
MIN_LEN, MAX_LEN = 4, 7
P_CORRECT = 0.25  # share of right answers in the pretraining corpus
PRETRAIN_STEPS = 600
BATCH_SIZE = 64
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
# Chat prompts render to the plain prompt text the model was pretrained on: no role markers.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% elif message['role'] == 'user' %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)
_PROMPT_RE = re.compile(r"sort:\s*([a-z]+)\s*=")
_DEFAULT_SIZE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)


@dataclass(frozen=True)
class TinyTask:
    """Where the built-in task lives: <cache>/tiny-task-<TASK_VERSION>/model plus the shipped prompts."""

    model_dir: Path  # Hugging Face folder (config, safetensors, tokenizer, chat template)
    prompts_file: Path
    eval_prompts_file: Path
    reward: str


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


def write_prompt_split(paths: tuple[Path, Path], draw, to_prompt, seed: int, n_train: int,
                       n_eval: int) -> tuple[Path, Path]:
    """Write distinct draws as (training, held-out) prompt JSONL files; the two never overlap.
    Shared by the built-in tasks: `draw(rng)` gives a key, `to_prompt(key)` its prompt text."""
    rng, keys = random.Random(seed), []
    while len(keys) < n_train + n_eval:
        key = draw(rng)
        if key not in keys:
            keys.append(key)
    for path, chunk in zip(paths, (keys[:n_train], keys[n_train:])):
        path.write_text("".join(json.dumps({"prompt": to_prompt(k)}) + "\n" for k in chunk))
    return paths


def write_prompt_files(out_dir: Path = PACKAGE_DIR, seed: int = 1234, n_train: int = 64,
                       n_eval: int = 32) -> tuple[Path, Path]:
    """(Re)generate the shipped prompt files; training and eval words never overlap."""
    paths = Path(out_dir) / PROMPTS_FILE.name, Path(out_dir) / EVAL_PROMPTS_FILE.name
    return write_prompt_split(paths, _random_word, make_prompt, seed, n_train, n_eval)


def read_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- model


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer without merges: every byte is a token, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([PAD, BOS, EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        padding_side="left", chat_template=CHAT_TEMPLATE, model_max_length=64,
    )


def build_model(tokenizer, seed: int = 0, **size) -> LlamaForCausalLM:
    """A tiny Llama (defaults in _DEFAULT_SIZE, override with keyword arguments)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=64,
                         tie_word_embeddings=True, **ids, **{**_DEFAULT_SIZE, **size})
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids, do_sample=True, temperature=1.0, top_p=1.0,
                                               top_k=0, max_new_tokens=16)
    return model


def _batch(tokenizer, pairs: list[tuple[str, str]]):
    """Right-padded input ids and labels (loss on the completion and EOS only).

    No attention mask is needed: with right padding, causal attention never lets a real token
    see a pad, and skipping the mask makes each step ~15 % faster.
    """
    import torch

    prompts = tokenizer([p for p, _ in pairs])["input_ids"]
    answers = tokenizer([c for _, c in pairs])["input_ids"]
    width = max(len(p) + len(c) for p, c in zip(prompts, answers)) + 1
    ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
    labels = torch.full((len(pairs), width), -100)
    for r, (p, c) in enumerate(zip(prompts, answers)):
        c = c + [tokenizer.eos_token_id]
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        labels[r, len(p) : len(p) + len(c)] = torch.tensor(c)
    return ids, labels


def pretrain_loop(model, tokenizer, example, steps: int, lr: float, schedule, seed: int = 0, progress=None,
                  make_batch=None) -> float:
    """Next-token training on freshly drawn corpus batches (`example(rng)` gives a (prompt, completion)
    pair, `schedule(step)` the lr factor); returns the final loss. Shared by the built-in tasks."""
    import torch

    make_batch = make_batch or _batch
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        ids, labels = make_batch(tokenizer, [example(rng) for _ in range(BATCH_SIZE)])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step + 1)
    model.eval()
    return loss.item()


def pretrain(model, tokenizer, steps: int, seed: int = 0, progress=None) -> float:
    """Letter-sorting pretraining: warm-up, then a linear decay to 10 % of the peak lr.

    `progress(step)` is called after each step (for a progress bar).
    """
    warmup = max(1, steps // 20)
    return pretrain_loop(model, tokenizer, corpus_example, steps, 5e-3,
                         lambda s: min((s + 1) / warmup, 1 - s / steps * 0.9), seed, progress)


def save_untrained_model(out_dir: Path, seed: int = 0) -> Path:
    """An untrained tiny model + tokenizer in `out_dir` (for fast tests: well under 2 s)."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=seed).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("BOND_CACHE") or Path.home() / ".cache" / "bond")


def _task(folder: Path) -> TinyTask:
    return TinyTask(folder / "model", PROMPTS_FILE, EVAL_PROMPTS_FILE, REWARD_SPEC)


def _pretrain_with_bar(model, tokenizer, seed: int, quiet: bool) -> float:
    if quiet:
        return pretrain(model, tokenizer, PRETRAIN_STEPS, seed=seed)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        job = bar.add_task("pretraining the tiny model", total=PRETRAIN_STEPS)
        return pretrain(model, tokenizer, PRETRAIN_STEPS, seed=seed,
                        progress=lambda s: bar.update(job, completed=s))


def _build_into(folder: Path, seed: int, quiet: bool) -> None:
    """Pretrain into folder/model (plain Hugging Face files) and write the folder/tiny_task.json marker."""
    import torch

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    # One thread: a second one only gains ~15 % on this tiny model, yet on a busy CPU (Dask
    # workers, a Prefect server) its spin-waits made pretraining 2-6x slower. It also keeps the
    # result independent of the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        loss = _pretrain_with_bar(model, tokenizer, seed, quiet)
    finally:
        torch.set_num_threads(threads)
    seconds = round(time.perf_counter() - start, 1)
    cpu_seconds = round(time.process_time() - cpu_start, 1)  # wall time also counts other load
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    meta = dict(task_version=TASK_VERSION, seed=seed, steps=PRETRAIN_STEPS, final_loss=loss,
                pretrain_seconds=seconds, pretrain_cpu_seconds=cpu_seconds)
    (folder / "tiny_task.json").write_text(json.dumps(meta, indent=2) + "\n")


def ensure_built(final: Path, marker: str, build, announce: str | None) -> None:
    """Make `final` exist with `final/marker` in it, building at most once. Shared by the built-in
    tasks: `build(tmp)` fills a temporary sibling folder, which is then renamed into place, so
    `final` exists only when complete; a concurrent builder that loses the race discards its copy."""
    if (final / marker).is_file():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    if announce:
        print(announce)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        if final.exists() and not (final / marker).is_file():
            shutil.rmtree(final)  # not ours: every folder we rename into place has the marker
        os.rename(tmp, final)
    except OSError:
        if not (final / marker).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_tiny_task(cache_dir: Path | None = None, *, quiet: bool = False, seed: int = 0) -> TinyTask:
    """The tiny task, pretraining its model once into the cache (about 45 s on one CPU core)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    suffix = "" if seed == 0 else f"-seed{seed}"
    final = cache_dir / f"tiny-task-{TASK_VERSION}{suffix}"
    announce = None if quiet else f"Building the tiny task model once (about 45 s on one CPU core) into {final}"
    ensure_built(final, "tiny_task.json", lambda tmp: _build_into(tmp, seed, quiet), announce)
    return _task(final)


# ----------------------------------------------------------------------------- measurement


def best_of_n_stats(model_dir: Path, prompts: list[str], n: int = 8, seed: int = 0,
                    max_new_tokens: int = 16) -> dict[str, float]:
    """Sample n completions per prompt and summarise what Best-of-N gains over one sample."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return sample_stats(model, AutoTokenizer.from_pretrained(model_dir), prompts, n, seed, max_new_tokens)


def sample_stats(model, tokenizer, prompts: list[str], n: int = 8, seed: int = 0,
                 max_new_tokens: int = 16) -> dict[str, float]:
    """best_of_n_stats on an in-memory model (plain ancestral sampling: temperature 1, no top-p/k)."""
    import torch

    torch.manual_seed(seed)
    one, best, distinct, tied_pairs, all_tied, best_tied = [], [], [], [], [], []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 num_return_sequences=n, max_new_tokens=max_new_tokens)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        scores = reward([(prompt, t) for t in texts])
        one.append(sum(scores) / n)
        best.append(max(scores))
        distinct.append(len(set(texts)))
        pairs = [(a, b) for i, a in enumerate(scores) for b in scores[i + 1:]]
        tied_pairs.append(sum(a == b for a, b in pairs) / len(pairs))
        all_tied.append(float(len(set(scores)) == 1))
        best_tied.append(float(scores.count(max(scores)) > 1))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return dict(mean_one=mean(one), mean_best=mean(best), distinct=mean(distinct),
                tied_pair_rate=mean(tied_pairs), all_tied_rate=mean(all_tied),
                best_tied_rate=mean(best_tied))


if __name__ == "__main__":  # python -m bond_data.tiny_task: build (or reuse) and print the numbers
    task = ensure_tiny_task()
    print(json.loads((task.model_dir.parent / "tiny_task.json").read_text()))
    print(best_of_n_stats(task.model_dir, read_prompts(task.prompts_file)))
