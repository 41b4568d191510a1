"""Generation throughput: `TransformersBackend.generate` against one `model.generate` call per prompt.

Ours batches rows across prompts *and* samples (micro-batches of `--batch-size` rows, each row
with its own seed). The baseline is what TRL's former `BestOfNSampler` did: for each prompt, one
`model.generate(..., do_sample=True, num_return_sequences=k)` call, so each call batches only the
k samples of one prompt. Both sides use the same model object (the pipeline's tiny Llama, untrained,
built by `save_untrained_model`), the same prompts, k, temperature 1 / top-p 1 and max_new_tokens,
in the same process, and both keep the KV cache. An untrained model rarely emits EOS, so nearly
every row runs to max_new_tokens; we count the generated tokens (up to and including EOS) on both
sides and report tokens/s. Samples are random, so "equivalent" means: k completions per prompt,
none longer than max_new_tokens, and token counts within 5 % of each other.

    .venv/bin/python bench/generate.py [--prompts 64 --k 8 --new-tokens 32 --batch-size 64] [--quick]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from bond_data.backends.base import PromptJob, Sampling
from bond_data.backends.hf import TransformersBackend
from bond_data.tasks.common import save_untrained_model
from bond_data.tasks.tiny import LETTERS, make_prompt


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [make_prompt("".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 7)))) for _ in range(n)]


def run_ours(backend: TransformersBackend, prompts: list[str], k: int, sampling: Sampling) -> list[list[int]]:
    """Token counts per prompt (one per sample)."""
    jobs = [PromptJob(str(j), p, None, list(range(k)), [1000 * j + s for s in range(k)]) for j, p in enumerate(prompts)]
    return [[len(c.token_ids) for c in outs] for outs in backend.generate(jobs, sampling)]


@torch.inference_mode()
def run_baseline(model, tokenizer, prompts: list[str], k: int, sampling: Sampling) -> list[list[int]]:
    """One generate call per prompt with num_return_sequences=k; token counts up to the first EOS."""
    eos, counts = tokenizer.eos_token_id, []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**enc, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                             top_k=0, num_return_sequences=k, max_new_tokens=sampling.max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        rows = out[:, enc["input_ids"].shape[1]:].tolist()
        counts.append([row.index(eos) + 1 if eos in row else len(row) for row in rows])
    return counts


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="16 prompts, 3 repeats (~20 s)")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.repeats = 16, 3
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        backend = TransformersBackend.from_pretrained(str(save_untrained_model(Path(tmp) / "model")), batch_size=args.batch_size,
                                      device="cpu")
    model, tokenizer = backend.model, backend.tokenizer  # the baseline uses the very same weights
    prompts, k = make_prompts(args.prompts), args.k
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens)

    run_ours(backend, prompts[:2], k, sampling)  # warm-up (allocator, kernels, first-call costs)
    run_baseline(model, tokenizer, prompts[:2], k, sampling)
    times: dict[str, list[float]] = {"baseline": [], "ours": []}
    tokens: dict[str, list[int]] = {"baseline": [], "ours": []}
    for _ in range(args.repeats):  # interleaved, so background load hits both sides alike
        for name, fn, fargs in (("baseline", run_baseline, (model, tokenizer)), ("ours", run_ours, (backend,))):
            seconds, counts = timed(fn, *fargs, prompts, k, sampling)
            assert len(counts) == len(prompts) and all(len(c) == k for c in counts), name
            assert all(1 <= n <= args.new_tokens for c in counts for n in c), name
            times[name].append(seconds)
            tokens[name].append(sum(map(sum, counts)))

    mean_tokens = {name: statistics.mean(t) for name, t in tokens.items()}
    assert abs(mean_tokens["ours"] / mean_tokens["baseline"] - 1) < 0.05, mean_tokens
    print(f"{args.prompts} prompts x k={k} x {args.new_tokens} new tokens, batch_size={args.batch_size}, "
          f"{args.threads} threads, best of {args.repeats}")
    print(f"{'':10} {'best s':>8} {'median s':>9} {'tokens':>8} {'tokens/s':>9}")
    for name in ("baseline", "ours"):
        best = min(times[name])
        print(f"{name:10} {best:8.2f} {statistics.median(times[name]):9.2f} {mean_tokens[name]:8.0f} "
              f"{mean_tokens[name] / best:9.0f}")
    throughput = {name: mean_tokens[name] / min(times[name]) for name in times}
    print(f"time ratio: {min(times['baseline']) / min(times['ours']):.1f}x")
    print(f"speedup: {throughput['ours'] / throughput['baseline']:.1f}x (baseline / ours, time per generated token)")


if __name__ == "__main__":
    main()
