"""Scoring throughput: `score_pairs(sort_by_length=True)` against the same call with sorting off.

Both sides call `bond_data.score.score_pairs` with the same micro-batch size, the same pairs and
the same reward model, so the only difference is the order rows are cut into micro-batches. The
reward model is a real padded-batch one, built like the store's folder RMs are run: a tiny
`LlamaForSequenceClassification` (num_labels=1, random weights) over the pipeline's byte-level
tokenizer, scoring `tokenizer(texts, padding=True, return_tensors="pt")` under inference_mode.
Completion lengths are lognormal (most short, a few long), as sampled completions are: unsorted,
nearly every micro-batch holds one long row and is padded to it. Right padding plus the attention
mask make a row's reward independent of its batch mates, so both sides must agree (atol 1e-4:
different batch shapes round differently). The table also counts the padded tokens each side fed.

    .venv/bin/python bench/score.py [--pairs 1024 --batch-size 32] [--quick]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from bond_data.score import score_pairs
from bond_data.tasks.common import build_tokenizer
from bond_data.tasks.tiny import LETTERS, make_prompt


def make_pairs(n: int, median_chars: float, sigma: float, max_chars: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        length = min(max_chars, max(1, round(rng.lognormvariate(np.log(median_chars), sigma))))
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 7)))
        pairs.append((make_prompt(word), " " + "".join(rng.choice(LETTERS + " ") for _ in range(length))))
    return pairs


def build_reward_model(hidden: int, layers: int, max_len: int, seed: int = 0):
    tokenizer = build_tokenizer()  # byte-level; its pad token is set
    tokenizer.padding_side, tokenizer.model_max_length = "right", max_len
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                         max_position_embeddings=max_len, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.mul_(20.0)  # rewards of order 1, so atol 1e-4 is a real check
    padded = [0]  # tokens fed to the model, padding included

    @torch.inference_mode()
    def score_batch(pairs: list[tuple[str, str]]) -> list[float]:
        enc = tokenizer([p + c for p, c in pairs], padding=True, return_tensors="pt")
        padded[0] += enc["input_ids"].numel()
        return model(**enc).logits[:, 0].float().tolist()

    return score_batch, padded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--median-chars", type=float, default=24.0, help="median completion length")
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of completion lengths")
    ap.add_argument("--max-chars", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="256 pairs, 2 repeats (~20 s)")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.repeats = 256, 2
    torch.set_num_threads(args.threads)

    pairs = make_pairs(args.pairs, args.median_chars, args.sigma, args.max_chars)
    score_batch, padded = build_reward_model(args.hidden, args.layers, max_len=args.max_chars + 64)
    sides = {"unsorted (baseline)": False, "sorted (ours)": True}
    for sort in sides.values():  # warm-up
        score_pairs(score_batch, pairs[: 4 * args.batch_size], args.batch_size, sort_by_length=sort)
    times: dict[str, list[float]] = {name: [] for name in sides}
    tokens: dict[str, int] = {}
    rewards: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleaved, so background load hits both sides alike
        for name, sort in sides.items():
            padded[0] = 0
            start = time.perf_counter()
            rewards[name] = score_pairs(score_batch, pairs, args.batch_size, sort_by_length=sort)
            times[name].append(time.perf_counter() - start)
            tokens[name] = padded[0]

    base, ours = (np.array(rewards[name]) for name in sides)
    assert np.isfinite(base).all() and base.std() > 1e-2, base.std()  # rewards vary: the check means something
    assert np.allclose(base, ours, rtol=0, atol=1e-4), np.abs(base - ours).max()
    lengths = [len(p) + len(c) for p, c in pairs]
    print(f"{args.pairs} pairs, batch_size={args.batch_size}, lengths (chars) median {statistics.median(lengths):.0f} "
          f"mean {statistics.mean(lengths):.0f} max {max(lengths)}, {args.threads} threads, best of {args.repeats}; "
          f"max |diff| {np.abs(base - ours).max():.1e}")
    print(f"{'':20} {'best s':>7} {'median s':>9} {'padded tokens':>14} {'pairs/s':>8}")
    for name, ts in times.items():
        print(f"{name:20} {min(ts):7.2f} {statistics.median(ts):9.2f} {tokens[name]:14,} {args.pairs / min(ts):8.0f}")
    print(f"speedup: {min(times['unsorted (baseline)']) / min(times['sorted (ours)']):.1f}x (baseline / ours)")


if __name__ == "__main__":
    main()
