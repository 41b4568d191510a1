"""The transformers backend's per-step sampler (`SeededGumbelSampler`: seeded Gumbel noise over the
whole vocabulary, per-token log-probs) against the same class at an earlier commit, in one process:
time per decoding step at a large vocabulary, and whether both sample the same tokens with the same
log-probs (they must: the noise is a pure function of seed, step and token).

    python bench/sampler.py                      # against 18a6fa8 (before the in-place noise)
    python bench/sampler.py --before REV --rows 256 --vocab 151936 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
from at_commit import module_at  # bench/, beside this script

from bond_data.backends import hf as current
from bond_data.backends.base import Sampling


def run(module, logits: torch.Tensor, steps: int, sampling: Sampling):
    rows = logits.shape[0]
    sampler = module.SeededGumbelSampler(list(range(rows)), sampling, prompt_len=4)
    ids = torch.zeros(rows, 4, dtype=torch.long, device=logits.device)
    chosen = []
    if logits.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        chosen.append(sampler(ids, logits).argmax(-1))
        ids = torch.cat([ids, chosen[-1][:, None]], 1)
    anchor, sample = sampler.finish(ids[:, -1])
    if logits.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps, (torch.stack(chosen), anchor, sample)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="18a6fa8", help="the commit to compare with, or a file holding that hf.py")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, device=args.device)
    sampling = Sampling(temperature=args.temperature, max_new_tokens=args.steps)
    before = module_at(args.before, "bond_data/backends/hf.py")
    times = {"before": [], "after": []}
    for _ in range(3):  # interleaved, best of 3: the machine is shared
        t_before, out_before = run(before, logits, args.steps, sampling)
        t_after, out_after = run(current, logits, args.steps, sampling)
        times["before"].append(t_before)
        times["after"].append(t_after)
    same = all(torch.equal(a, b) for a, b in zip(out_before, out_after))
    b, a = min(times["before"]), min(times["after"])
    print(f"sampler step, {args.rows} rows x {args.vocab} tokens on {args.device}, temperature {args.temperature}: "
          f"{args.before} {b * 1e3:.0f} ms, now {a * 1e3:.0f} ms: {b / a:.2f}x; same tokens and log-probs: {same}")


if __name__ == "__main__":
    main()
