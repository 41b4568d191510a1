"""The chunked LM head alone (bond_data/logprobs.py), forward + backward: this commit against an
earlier one (default 631d2d3: the backward with max / sum / divide passes), and this one with its
forward logsumexp compiled (`fused_lse`, what the trainer runs with `compile: true`), and that with
the backward's matmuls on bf16 inputs (`bf16_backward`, the trainer's `head_backward: bf16`). Same
inputs, interleaved, best of `--repeats`; the log-probs must agree, the gradients to bf16 rounding.

    python bench/head.py --quick [--fused] [--bf16-backward]      # CPU, small
    python bench/head.py --device cuda --before .whl/old_logprobs.py   # on a lent GPU machine (no .git
        # there): here first `git show 631d2d3:bond_data/logprobs.py > .whl/old_logprobs.py`, carry [".whl"]
    python bench/head.py --quick --fused --bf16-backward --before adaeb75 --before-options
        # the fused backward softmax against the commit before it, both on the last variant's options
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from at_commit import module_at  # bench/, beside this script

import bond_data.logprobs as now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--before", default="631d2d3", help="a commit, or a file holding that logprobs.py")
    ap.add_argument("--tokens", type=int, default=None, help="completion tokens (default: 10240 on CUDA, 2048 on CPU)")
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="CPU: 512 tokens, hidden 128")
    ap.add_argument("--fused", action="store_true", help="on the CPU too: the compiled-logsumexp variant")
    ap.add_argument("--bf16-backward", action="store_true",
                    help="on the CPU too: every variant under bf16 autocast, and the head's backward in bf16")
    ap.add_argument("--before-options", action="store_true",
                    help="`before` with the last variant's fused_lse / bf16_backward (a `before` that has them)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    m = args.tokens or (10240 if cuda else 512 if args.quick else 2048)
    hidden_size = 128 if args.quick else args.hidden
    g = torch.Generator().manual_seed(0)
    h = torch.randn(m, hidden_size, generator=g).to(device).requires_grad_()
    w = (torch.randn(args.vocab, hidden_size, generator=g) * 0.05).to(device).requires_grad_()
    y = torch.randint(0, args.vocab, (m,), generator=g).to(device)
    coef = torch.randn(m, generator=g).to(device)
    variants = {"before": (module_at(args.before, "bond_data/logprobs.py"), {}), "now": (now, {})}
    if cuda or args.fused:
        variants["now, fused_lse (compile: true)"] = (now, {"fused_lse": True})
    if cuda or args.bf16_backward:  # under bf16 autocast (on the CPU too, with the flag)
        variants["fused_lse + bf16 backward"] = (now, {"fused_lse": cuda or args.fused, "bf16_backward": True})
    if args.before_options:  # time one change to the fused / bf16 path itself
        variants["before"] = (variants["before"][0], dict(list(variants.values())[-1][1]))

    def run(variant):
        mod, kw = variant
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda or args.bf16_backward):  # TF32 head on a GPU
            out = mod.chunked_token_logprobs(h, y, w, chunk=512, **kw)
            grads = torch.autograd.grad((out * coef).sum(), (h, w))
        return out.detach(), grads

    results, times = {}, {k: [] for k in variants}
    for name, mod in variants.items():  # warm-up (and compilation)
        results[name] = run(mod)
    for _ in range(args.repeats):
        for name, mod in variants.items():
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            run(mod)
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    where = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{where}, torch {torch.__version__}: chunked head fwd+bwd, {m} tokens x {hidden_size} hidden x "
          f"{args.vocab} vocab, chunks of 512{', bf16 autocast (TF32 head)' if cuda else ''}")
    base = min(times["before"])
    ref_out, ref_grads = results["before"]
    for name, ts in times.items():
        out, grads = results[name]
        d_out = float((out - ref_out).abs().max())
        d_grad = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads, ref_grads))
        print(f"{name:>30}: {min(ts) * 1e3:8.1f} ms, {m / min(ts):,.0f} tokens/s, {base / min(ts):.2f}x; against "
              f"before: log p {d_out:.1e} nats, gradients {d_grad:.1e} of their largest entry")


if __name__ == "__main__":
    main()
