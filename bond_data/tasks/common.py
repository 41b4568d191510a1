"""What every built-in task shares: the byte-level tokenizer, the tiny Llama, the pretraining loop,
the build-once cache, prompt files and plain sampling.

A task (one small file beside this one) brings its prompts, its pretraining corpus and its reward;
`ensure_task` pretrains its model once into `<cache>/<name>-<version>[-seed<k>]` (`$BOND_CACHE` or
~/.cache/bond) and returns a `Task`: the model folder, the shipped prompt files and the reward spec
that `bond score --rm` and the evaluation take.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bond_data.files import atomic_path

if TYPE_CHECKING:  # heavy imports stay lazy: `bond --help` should not import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

TASKS_DIR = Path(__file__).resolve().parent
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
BATCH_SIZE = 64  # pretraining examples per step
# Chat prompts render to the plain prompt text the model was pretrained on: no role markers.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% elif message['role'] == 'user' %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)
DEFAULT_SIZE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)


@dataclass(frozen=True)
class Task:
    """Where a built-in task lives: its cached model plus the shipped prompts and its reward."""

    model_dir: Path  # Hugging Face folder (config, safetensors, tokenizer, chat template)
    prompts_file: Path
    eval_prompts_file: Path
    reward: str  # "module:function", as `bond score --rm` takes it


# ----------------------------------------------------------------------------- prompts


def write_prompt_split(paths: tuple[Path, Path], draw, to_prompt, seed: int, n_train: int,
                       n_eval: int) -> tuple[Path, Path]:
    """Write distinct draws as (training, held-out) prompt JSONL files; the two never overlap.
    `draw(rng)` gives a key, `to_prompt(key)` its prompt text."""
    rng, keys = random.Random(seed), []
    while len(keys) < n_train + n_eval:
        key = draw(rng)
        if key not in keys:
            keys.append(key)
    for path, chunk in zip(paths, (keys[:n_train], keys[n_train:])):
        path.write_text("".join(json.dumps({"prompt": to_prompt(k)}) + "\n" for k in chunk))
    return paths


def read_prompts(path: Path) -> list[str]:
    """The prompt texts of a shipped JSONL file."""
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
    """A tiny Llama (defaults in DEFAULT_SIZE, override with keyword arguments)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=64,
                         tie_word_embeddings=True, **ids, **{**DEFAULT_SIZE, **size})
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids, do_sample=True, temperature=1.0, top_p=1.0,
                                               top_k=0, max_new_tokens=16)
    return model


def save_untrained_model(out_dir: Path, seed: int = 0) -> Path:
    """An untrained tiny model + tokenizer in `out_dir` (for fast tests: well under 2 s)."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=seed).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def right_padded_batch(tokenizer, pairs: list[tuple[str, str]]):
    """Right-padded input ids and labels (loss on the completion and EOS only).

    No attention mask is needed: with right padding, causal attention never lets a real token
    see a pad, and skipping the mask makes each step faster.
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
                  make_batch=right_padded_batch) -> float:
    """Next-token training on freshly drawn corpus batches (`example(rng)` gives a (prompt, completion)
    pair, `schedule(step)` the lr factor); returns the final loss."""
    import torch

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


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("BOND_CACHE") or Path.home() / ".cache" / "bond")


def build_into(folder: Path, marker: str, pretrain: Callable, steps: int, seed: int, label: str,
               quiet: bool, meta: dict) -> None:
    """Pretrain a fresh tiny model with `pretrain(model, tokenizer, steps, seed=, progress=)` into
    folder/model (plain Hugging Face files), then write folder/marker (what "complete" means).

    One thread: a second one gains little on this tiny model, yet on a busy CPU (Dask workers, a
    Prefect server) its spin-waits made pretraining several times slower. It also keeps the
    weights independent of the machine's core count."""
    import torch

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        if quiet:
            loss = pretrain(model, tokenizer, steps, seed=seed)
        else:
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                job = bar.add_task(f"pretraining the {label} model", total=steps)
                loss = pretrain(model, tokenizer, steps, seed=seed, progress=lambda s: bar.update(job, completed=s))
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    meta = {**meta, "seed": seed, "steps": steps, "final_loss": loss,
            "pretrain_seconds": round(time.perf_counter() - start, 1),
            "pretrain_cpu_seconds": round(time.process_time() - cpu_start, 1)}  # wall time counts other load
    (folder / marker).write_text(json.dumps(meta, indent=2) + "\n")


def ensure_built(final: Path, marker: str, build: Callable[[Path], None], announce: str | None) -> None:
    """Make `final` exist with `final/marker` in it, building at most once: `build(tmp)` fills a
    temporary sibling folder that is renamed into place, so `final` exists only when complete; a
    concurrent builder that loses the race discards its copy."""
    if (final / marker).is_file():
        return
    if announce:
        print(announce)
    with atomic_path(final, keep_existing=lambda path: (path / marker).is_file()) as tmp:
        tmp.mkdir()
        build(tmp)


def cached_task_folder(name: str, version: str, seed: int, cache_dir: Path | None) -> Path:
    """<cache>/<name>-<version>, with -seed<k> for a seed other than 0."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / f"{name}-{version}{'' if seed == 0 else f'-seed{seed}'}"


# ----------------------------------------------------------------------------- sampling


def sample_completions(model, tokenizer, prompts: list[str], n: int = 8, seed: int = 0,
                       max_new_tokens: int = 16, chunk: int = 64) -> list[list[str]]:
    """n completions for each prompt (ancestral sampling: temperature 1, no top-p/k), as text,
    `chunk` prompts at a time through one left-padded generate call."""
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


def pool_stats(pools: list[list[float]]) -> dict[str, float]:
    """Per-pool reward summaries, averaged over pools: mean of one sample, mean of the best, the
    share of tied sample pairs, of all-tied pools and of pools whose best is shared."""
    def mean(xs):
        return sum(xs) / len(xs)

    def tied_pairs(s):
        pairs = [(a, b) for i, a in enumerate(s) for b in s[i + 1:]]
        return sum(a == b for a, b in pairs) / max(1, len(pairs))

    return {"mean_one": mean([mean(s) for s in pools]), "mean_best": mean([max(s) for s in pools]),
            "tied_pair_rate": mean([tied_pairs(s) for s in pools]),
            "all_tied_rate": mean([float(len(set(s)) == 1) for s in pools]),
            "best_tied_rate": mean([float(s.count(max(s)) > 1) for s in pools])}
