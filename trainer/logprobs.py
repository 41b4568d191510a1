"""Sequence log-probabilities of completions under a causal LM: the one place the trainer, online
J-BOND and the evaluation turn (prompt ids, completion ids) rows into log pi(y | x)."""

from __future__ import annotations

import contextlib

import torch

from bond_data import precision as precision_policy
from trainer.losses import sequence_logprobs


def collate(rows: list[dict], device: torch.device):
    """Rows {"prompt": ids, "completion": ids} -> right-padded [B, T] input ids and attention mask,
    [B, T-1] labels (the next tokens) and mask (1 on completion positions)."""
    seqs = [r["prompt"] + r["completion"] for r in rows]
    width = max(map(len, seqs))
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width - 1)
    for b, (r, s) in enumerate(zip(rows, seqs)):
        input_ids[b, : len(s)] = torch.tensor(s)
        attention[b, : len(s)] = 1
        mask[b, len(r["prompt"]) - 1 : len(s) - 1] = 1  # position t predicts token t + 1
    return input_ids.to(device), attention.to(device), input_ids[:, 1:].to(device), mask.to(device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def completion_logprobs(model, rows: list[dict], device: torch.device, precision: str = "auto") -> torch.Tensor:
    """[B] log model(completion | prompt), summed over the completion's tokens (with gradient
    unless called under no_grad / inference_mode), under a bond_data.precision policy (auto: by device)."""
    input_ids, attention, labels, mask = collate(rows, device)
    with precision_policy.autocast(precision_policy.resolve(precision, device), device):
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]  # [B, T-1, V]
    return sequence_logprobs(logits, labels, mask)  # [B]
