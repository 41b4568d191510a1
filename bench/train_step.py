"""The BOND training step before and after issue 12, same model and same rows: tokens/s and peak memory.

- `before`: the step as it was: right-padded rows, the full [B, T, V] logits (the LM head in fp32,
  as bond_data/precision.py wants), their fp32 log-softmax (`full_logits_logprobs`), Jeffreys
  loss, backward;
- `after`: `trainer.train.train_step`: packed rows, the LM head only at completion positions, in
  checkpointed chunks (`bond_data/logprobs.py`); optionally torch.compile / activation checkpointing;
  `liger` (CUDA, measured only: `pip install liger-kernel`, not a dependency) swaps Qwen2's RMSNorm,
  RoPE and SwiGLU for Liger's Triton kernels; `varlen` attends through bond_data/attention.py
  (`attn_implementation: varlen`: torch's variable-length flash kernel on CUDA, each micro-batch in
  one row without padding; on the CPU the same math row by row); `-1mb`: the step's rows in one
  micro-batch instead of two (same rows, same loss; half the per-micro-batch overhead); `-bf16bwd`:
  the LM head's backward matmuls on bf16 inputs (`head_backward: bf16`; the loss is the same, the
  gradients differ by bf16 rounding).

Each variant runs in its own child process, so its peak memory is its own: on CUDA
`torch.cuda.max_memory_allocated`, on the CPU the rise of the peak RSS over the RSS before the
timed steps (getrusage; tracemalloc does not see torch's allocations). Both print the loss of the
same first step, which must agree (the math is unchanged). Tokens are real tokens (prompt +
completion), never padding.

On the CPU the model is a small Qwen2 shape whose 151,936-token vocabulary dominates, which is the
memory case the issue targets; on CUDA it is a ~0.5B Qwen2 shape (896 hidden, 24 layers, tied
151,936 vocabulary), bf16 autocast, completions of 256-1024 tokens, and the script also prints
absolute tokens/s and MFU = 6 * params * tokens/s over the card's dense bf16 peak.

    python bench/train_step.py --quick            # CPU, under 2 minutes
    python bench/train_step.py                    # CPU, default sizes
    python bench/train_step.py --device cuda      # GPU: before vs after (and strict-head), compile, checkpointing, FSDP2
    bash bench/gpu_all.sh                         # every GPU figure on a lent GPU machine, output under $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch

from bond_data.device import peak_bf16_flops

VARIANTS = {"before": ("before", ()), "after": ("after", ()), "compile": ("after", ("--compile",)),
            "checkpointing": ("after", ("--checkpointing",)), "fsdp": ("after", ("--fsdp",)),
            "strict-head": ("after", ("--strict-head",)), "liger": ("after", ("--liger",)),
            "liger-compile": ("after", ("--liger", "--compile")), "varlen": ("after", ("--varlen",)),
            "varlen-compile": ("after", ("--varlen", "--compile")),
            "varlen-compile-1mb": ("after", ("--varlen", "--compile", "--one-micro-batch")),
            "varlen-compile-bf16bwd": ("after", ("--varlen", "--compile", "--head-bf16-backward")),
            "varlen-compile-1mb-bf16bwd": ("after", ("--varlen", "--compile", "--one-micro-batch", "--head-bf16-backward"))}
SIZES = {  # model shape, rows per micro-batch, micro-batches per step, completion lengths, prompt lengths
    "cpu-quick": dict(hidden=128, inter=384, layers=2, rows=8, micro=1, completion=(32, 160), prompt=(16, 32), steps=2),
    "cpu": dict(hidden=256, inter=704, layers=4, rows=8, micro=1, completion=(128, 384), prompt=(32, 64), steps=3),
    "cuda": dict(hidden=896, inter=4864, layers=24, rows=16, micro=2, completion=(256, 1024), prompt=(64, 128), steps=10),
}


def build_model(size: dict, device: torch.device, attn: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = max(2, size["hidden"] // 64)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=size["hidden"], intermediate_size=size["inter"],
                      num_hidden_layers=size["layers"], num_attention_heads=heads, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True, attn_implementation=attn)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 0.5B model's CPU init alone takes longer than the steps
        return Qwen2ForCausalLM(cfg).train()


def build_rows(size: dict) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    length = lambda lo_hi: int(torch.randint(lo_hi[0], lo_hi[1] + 1, (1,), generator=g))
    rows = []
    for _ in range(size["rows"] * size["micro"]):
        n = length(size["completion"])
        rows.append({"prompt": torch.randint(3, 151936, (length(size["prompt"]),), generator=g).tolist(),
                     "completion": torch.randint(3, 151936, (n,), generator=g).tolist(),
                     "weight": float(torch.rand(1, generator=g)) * 2, "logp_anchor": -n * math.log(151936)})
        rows[-1]["weight_pool"] = rows[-1]["weight"]
    return rows


def step_before(policy, micro_batches, beta, gamma, global_rows, device) -> dict:
    """The training step as it was before issue 12 (padded rows, full logits), forward + backward."""
    from bond_data.logprobs import collate, full_logits_logprobs
    from trainer.losses import jeffreys_loss

    loss, fed = 0.0, 0
    for rows in micro_batches:
        fed += collate(rows, torch.device("cpu"))[0].numel()
        logp_policy = full_logits_logprobs(policy, rows, device)  # [B]
        col = {k: torch.tensor([r[k] for r in rows], device=device) for k in ("logp_anchor", "weight", "weight_pool")}
        terms = jeffreys_loss(logp_policy, col["logp_anchor"], col["weight"], beta, gamma, col["weight_pool"])
        (terms["loss"] * len(rows) / global_rows).backward()
        loss += float(terms["loss"].detach()) * len(rows) / global_rows
    tokens = sum(len(r["prompt"]) + len(r["completion"]) for m in micro_batches for r in m)
    return {"loss": loss, "padding": 1 - tokens / fed}


def worker(args) -> None:
    """One variant in this (child) process; prints one JSON line."""
    from bond_data.logprobs import SequenceLogprobs
    from trainer.step import train_step

    device = torch.device(args.device)
    if args.strict_head:  # the chunked head's matmuls in IEEE fp32 even under CUDA autocast (as before TF32)
        import bond_data.logprobs

        bond_data.logprobs.HEAD_TF32 = False
    if args.liger:  # Liger's Triton RMSNorm, RoPE and SwiGLU in the Qwen2 modules (CUDA only; not a dependency)
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    size = SIZES[args.size]
    if args.one_micro_batch:  # the step's rows in one micro-batch: fewer, larger kernels (the same rows and loss)
        size = {**size, "rows": size["rows"] * size["micro"], "micro": 1}
    policy = build_model(size, device, args.attn)
    if args.varlen:  # attn_implementation: varlen (bond_data/attention.py): a micro-batch in one row, no mask
        from bond_data import attention

        policy.set_attn_implementation(attention.register())
    rows = build_rows(size)
    micro = [rows[i : i + size["rows"]] for i in range(0, len(rows), size["rows"])]
    if args.variant == "before":
        from bond_data.precision import fp32_head

        fp32_head(policy)  # the step on main before issue 12: the precision policy's fp32 head, full logits
        step = lambda: step_before(policy, micro, 0.5, 0.05, len(rows), device)
    else:
        if args.checkpointing:
            enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        if args.compile:
            for layer in policy.get_decoder().layers:
                layer.compile(dynamic=True)
        model = SequenceLogprobs(policy, args.chunk, fused_lse=args.compile,  # as trainer/train.py's _wrap
                                 bf16_backward=args.head_bf16_backward)
        if args.fsdp:  # FSDP2 over a one-process group: its bf16 MixedPrecisionPolicy and hooks, no peers
            import os

            import torch.distributed as dist

            from trainer.fsdp import shard

            os.environ.update(MASTER_ADDR="localhost", MASTER_PORT="29591", RANK="0", WORLD_SIZE="1")
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            model = shard(model, policy.get_decoder().layers, device)
        step = lambda: train_step(model, micro, 0.5, 0.05, len(rows), 1, device)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)

    def one_step():
        m = step()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return m

    first = one_step()  # warm-up (and compilation); its loss is the comparable one
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    t = time.perf_counter()
    for _ in range(size["steps"]):
        one_step()
    sync(device)
    secs = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = size["steps"] * sum(len(r["prompt"]) + len(r["completion"]) for r in rows)
    if args.profile:  # where a step's GPU time goes: the kernels by total time, to stderr
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            one_step()
            sync(device)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile, max_name_column_width=70), file=sys.stderr)
    print(json.dumps({"loss": first["loss"], "padding": first["padding"], "tokens_per_s": tokens / secs,
                      "peak_over_base": peak - base, "params": sum(p.numel() for p in policy.parameters())}))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(args, variant: str, *extra: str) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", variant, "--device", args.device, "--size", args.size,
           "--attn", args.attn, "--chunk", str(args.chunk), *extra]
    if args.profile:
        cmd += ["--profile", str(args.profile)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if args.profile else subprocess.PIPE, text=True,
                         check=False)
    if out.returncode != 0:
        tail = ((out.stderr or "").strip().splitlines() or ["?"])[-1]
        print(f"{variant} {' '.join(extra)}: failed ({tail[:200]})")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="CPU: a smaller model and batch (under 2 minutes)")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flex_attention, ...)")
    ap.add_argument("--chunk", type=int, default=512, help="completion tokens per LM-head chunk")
    ap.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS)} (default: before,after on "
                    "the CPU, all on CUDA)")
    ap.add_argument("--worker", choices=["before", "after"], help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="after the timed steps, profile one more and print its top ROWS ops by device time")
    ap.add_argument("--strict-head", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--liger", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--varlen", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one-micro-batch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--head-bf16-backward", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.variant = args.worker
        return worker(args)
    args.size = "cuda" if args.device.startswith("cuda") else "cpu-quick" if args.quick else "cpu"
    size = SIZES[args.size]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{name}, torch {torch.__version__}, Qwen2 shape {size['hidden']} hidden x {size['layers']} layers, "
          f"vocab 151936; {size['rows'] * size['micro']} rows per step ({size['micro']} micro-batches), "
          f"completions {size['completion'][0]}-{size['completion'][1]} tokens, {size['steps']} timed steps")
    names = args.variants.split(",") if args.variants else \
        list(VARIANTS) if args.device.startswith("cuda") else ["before", "after"]
    variants = [VARIANTS[n] for n in names]
    results = []
    for variant, extra in variants:
        r = run_variant(args, variant, *extra)
        if r is None:
            continue
        results.append((variant, extra, r))
        peak = peak_bf16_flops(torch.device(args.device)) if args.device.startswith("cuda") else None
        mfu = f", MFU {6 * r['params'] * r['tokens_per_s'] / peak:.1%}" if peak else ""
        print(f"{variant + ' ' + ' '.join(extra):>24}: {r['tokens_per_s']:,.0f} tokens/s{mfu}, peak memory "
              f"{r['peak_over_base'] / 2**20:,.0f} MiB over the model, padding {r['padding']:.1%}, loss {r['loss']:.6f}")
    base = next((r for v, e, r in results if v == "before"), None)
    after = next((r for v, e, r in results if v == "after" and not e), None)
    if base and after:
        assert abs(base["loss"] - after["loss"]) <= 1e-4 * max(1.0, abs(base["loss"])) or args.device != "cpu", \
            "before and after disagree on the loss"
        print(f"speed: {after['tokens_per_s'] / base['tokens_per_s']:.2f}x (after / before); peak memory of the "
              f"step: {base['peak_over_base'] / max(after['peak_over_base'], 1):.1f}x lower")


if __name__ == "__main__":
    main()
