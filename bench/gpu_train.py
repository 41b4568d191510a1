"""Trainer throughput on a GPU: tokens/s and MFU of the BOND training step at a realistic size.

The same ~125M-parameter Llama as bench/gpu_generate.py (32k vocabulary), trained with the real
step (`trainer.train.train_step`: bf16 autocast, Jeffreys loss on sequence log-probs, backward)
plus clipping and AdamW, on synthetic pool rows (prompt 32 + completion 96 tokens). MFU counts
6 * params * tokens (forward + backward) against the card's dense bf16 peak.

Baseline in the same process: the plain weighted-NLL step (forward term only, beta = 0), so the
ratio is the cost of the backward term and the anchor KL on top of SFT-style training.

    python bench/gpu_train.py [--steps 20 --micro-batch-size 32 --grad-accum 4]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from gpu_generate import build, sync  # bench/ is on sys.path when run as a script
from trainer.checkpoints import load_policy
from trainer.train import train_step

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro-batch-size", type=int, default=32)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp()) / "m"
    build(folder)
    device = torch.device(args.device)
    policy, _ = load_policy(folder, device)
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": torch.randint(3, 32000, (32,), generator=g).tolist(),
             "completion": torch.randint(3, 32000, (96,), generator=g).tolist(),
             "weight": float(torch.rand(1, generator=g)) * 2, "logp_anchor": -96 * math.log(32000)}
            for _ in range(args.micro_batch_size * args.grad_accum)]
    for r in rows:  # the backward term's (pool) weight: here the same as the forward one
        r["weight_pool"] = r["weight"]
    micro = [rows[i : i + args.micro_batch_size] for i in range(0, len(rows), args.micro_batch_size)]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    params = sum(p.numel() for p in policy.parameters())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(f"{name}, {params / 1e6:.0f}M params, {len(rows)} rows x 128 tokens per step")
    result = {}
    for label, beta in [("weighted NLL (beta=0)", 0.0), ("Jeffreys (beta=0.5)", 0.5)]:
        for warm in (True, False):
            sync()
            t, tokens = time.perf_counter(), 0
            for _ in range(3 if warm else args.steps):
                m = train_step(policy, micro, beta, 0.05, len(rows), 1, device)
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                tokens += sum(len(r["prompt"]) + len(r["completion"]) for r in rows)
            sync()
        secs = time.perf_counter() - t
        tps = tokens / secs
        mfu = f", MFU {6 * params * tps / peak:.1%}" if peak else ""
        result[label] = tps
        print(f"{label:>22}: {tps:,.0f} tokens/s (all positions){mfu}; loss {m['loss']:.3f}")
    print(f"Jeffreys step runs at {result['Jeffreys (beta=0.5)'] / result['weighted NLL (beta=0)']:.2f}x "
          f"the speed of the weighted-NLL step")


if __name__ == "__main__":
    main()
