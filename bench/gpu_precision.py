"""rho = pi / A at initialisation on a GPU: the generator's log A (the transformers backend, as
`bond generate` computes it) against the trainer's log pi of the same weights (packed rows, the
chunked head: `bond_data.logprobs.completion_logprobs`, in the trainer's micro-batches of 16), and
against the full-logits reference (one right-padded row each).

Each case is a precision policy (bond_data/precision.py), the matmul precision of the fp32 head
(`strict`: IEEE fp32; `tf32`: tensor-core TF32, the default of the chunked head under CUDA
autocast) and the layout of the generator's teacher-forced log A pass (`packed` as the trainer
packs, the default; `padded`: one right-padded row each). It prints max and mean |log A - log pi|
per completion: the spurious log-ratio the backward term would chase. On the CPU `tf32` changes
nothing (a smoke test of the script). Figures: bench/gpu/, README.md.

    python bench/gpu_precision.py                       # CUDA: tiny Llama and a ~0.5B Qwen2 shape
    python bench/gpu_precision.py --device cpu --quick  # the script's own smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_generate import build, load_backend  # noqa: E402  (the same random models and word-level tokenizer)

import bond_data.logprobs  # noqa: E402
from bond_data.backends.base import PromptJob, Sampling  # noqa: E402
from bond_data.logprobs import completion_logprobs, full_logits_logprobs  # noqa: E402


@contextlib.contextmanager
def head_matmul(mode: str):
    """fp32 matmuls as IEEE fp32 or TF32: every one (the fp32 policy's whole model), and the chunked
    head's under autocast (bond_data.logprobs.HEAD_TF32, on by default)."""
    old = torch.backends.cuda.matmul.allow_tf32, bond_data.logprobs.HEAD_TF32
    torch.backends.cuda.matmul.allow_tf32 = bond_data.logprobs.HEAD_TF32 = mode == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, bond_data.logprobs.HEAD_TF32 = old


def micro_batches(rows: list[dict], size: int):
    return [rows[i : i + size] for i in range(0, len(rows), size)]


@contextlib.contextmanager
def trainer_attention(model, attn: str):
    """The model attending as the trainer would with `attn_implementation: varlen`, restored after."""
    if attn == "same":
        yield
        return
    from bond_data import attention

    old = model.config._attn_implementation
    model.set_attn_implementation(attention.register())
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shape only, 8 prompts x k=2, 16 new tokens")
    ap.add_argument("--shapes", default="tiny,qwen2-0.5b")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=16, help="the trainer's rows per micro-batch")
    ap.add_argument("--generator-attn", choices=["sdpa", "varlen"], default="sdpa",
                    help="the generator's attn_implementation (varlen: its teacher-forced log A pass as the trainer's)")
    ap.add_argument("--trainer-attn", choices=["same", "varlen"], default="same",
                    help="the trainer's attention for its log pi: the generator's (same) or attn_implementation "
                    "varlen (bond_data/attention.py: each micro-batch in one row, torch's varlen kernel)")
    ap.add_argument("--cases", default="fp32:strict:padded,fp32:tf32:padded,bf16-autocast:strict:padded,"
                    "bf16-autocast:strict:packed,bf16-autocast:tf32:packed",
                    help="policy:head matmul:generator's log A layout, comma-separated")
    args = ap.parse_args()
    args.cases = [(p, h, lay == "packed") for p, h, lay in (c.split(":") for c in args.cases.split(","))]
    shapes = ["tiny"] if args.quick else args.shapes.split(",")
    if args.quick:
        args.prompts, args.k, args.new_tokens = 8, 2, 16
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}: |log A (generator) - log pi (trainer)| per completion at init, "
          f"{args.prompts} prompts x k={args.k}, {args.new_tokens} new tokens, trainer micro-batches of {args.micro_batch}")
    for shape in shapes:
        folder = Path(tempfile.mkdtemp()) / shape
        build(folder, shape)
        backend = load_backend(folder, args.device, batch_size=64, attn=args.generator_attn,
                               precision=None)  # fp32 weights: it runs every policy and is the trainer's model too
        prompts = [" ".join(f"w{(37 * p + 11 * i) % 30000 + 3}" for i in range(8 + p % 24)) for p in range(args.prompts)]
        jobs = [PromptJob(str(j), p, None, list(range(args.k)), [1000 * j + s for s in range(args.k)])
                for j, p in enumerate(prompts)]
        for policy, head, packed in args.cases:
            backend.packed_log_a = packed
            t = time.perf_counter()
            with head_matmul(head):
                out = backend.generate(jobs, Sampling(max_new_tokens=args.new_tokens, precision=policy))
                rows = [{"prompt": backend.render(job), "completion": c.token_ids, "A": c.anchor_logprob}
                        for job, cs in zip(jobs, out) for c in cs]
                with torch.no_grad(), trainer_attention(backend.model, args.trainer_attn):
                    trainer_lp = torch.cat([completion_logprobs(backend.model, m, device, policy)
                                            for m in micro_batches(rows, args.micro_batch)]).double().cpu()
                    full = torch.cat([full_logits_logprobs(backend.model, m, device, policy)
                                      for m in micro_batches(rows, args.micro_batch)]).double().cpu()
            anchor = torch.tensor([r["A"] for r in rows], dtype=torch.float64)
            length = sum(len(r["completion"]) for r in rows) / len(rows)
            d_packed, d_full = (anchor - trainer_lp).abs(), (anchor - full).abs()
            layout = "packed" if packed else "padded"
            trainer = "packed, chunked" + (", varlen" if args.trainer_attn == "varlen" else "") + \
                (", generator varlen" if args.generator_attn == "varlen" else "")
            print(f"{shape:>11} {policy:>13} head {head:>6} log A {layout}: trainer ({trainer}) max {d_packed.max():.2e} "
                  f"mean {d_packed.mean():.2e}; full-logits max {d_full.max():.2e} mean {d_full.mean():.2e} "
                  f"nats; mean log A {anchor.mean():.2f} over {length:.0f} tokens ({time.perf_counter() - t:.1f} s)")
        del backend
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
