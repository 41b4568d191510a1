"""Sequence log-probabilities of completions under a causal LM: the one place the trainer, online
J-BOND and the evaluation turn (prompt ids, completion ids) rows into log pi(y | x).

    log pi(y | x) = sum_t [ z_t[y_t] - logsumexp(z_t) ],   z_t = W h_t   (W: the LM head, [V, H])

computed without the [tokens, vocab] logits or their fp32 log-softmax: the decoder's last hidden
states are taken only at the M positions that predict completion tokens, and the head runs over
them in chunks of `chunk` tokens, each under activation checkpointing, so the forward keeps
nothing of size V and the backward recomputes one chunk's [chunk, V] logits at a time. At a 150k
vocabulary that is the difference between gigabytes and a few hundred megabytes per micro-batch.
Models whose head is not a plain linear layer (other than Gemma-2's final logit soft-capping,
handled here) would need their own head function.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.packing import Batch, collate_packed


def collate(rows: list[dict], device: torch.device):
    """Rows {"prompt": ids, "completion": ids} -> right-padded [B, T] input ids and attention mask,
    [B, T-1] labels (the next tokens) and mask (1 on completion positions): the layout of the
    full-logits path (`sequence_logprobs` in trainer/losses.py), kept as the reference."""
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


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    softcap: float | None) -> torch.Tensor:
    """[c] log-softmax of the head's logits at the targets, for one chunk of hidden states [c, H]."""
    logits = F.linear(hidden, weight, bias).float()  # [c, V], the only V-sized tensor, freed after
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None = None, chunk: int = 1024,
                           softcap: float | None = None) -> torch.Tensor:
    """[M] log p(targets) from hidden states [M, H] through the head (weight [V, H]), `chunk` rows at
    a time; with gradient, each chunk recomputed in the backward (nothing [M, V] is ever stored)."""
    out = []
    for s in range(0, hidden.shape[0], chunk):
        args = (hidden[s : s + chunk], targets[s : s + chunk], weight, bias, softcap)
        if torch.is_grad_enabled():
            out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(*args))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


class SequenceLogprobs(torch.nn.Module):
    """A causal LM as a module whose forward returns [B] completion log-probs of a `Batch`: what
    DDP / FSDP wrap, so their hooks see one forward per micro-batch."""

    def __init__(self, lm, chunk: int = 1024):
        super().__init__()
        self.lm = lm
        self.chunk = chunk

    def forward(self, input_ids, attention_mask, position_ids, index, targets, row, n_rows: int) -> torch.Tensor:
        out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False)
        hidden = out.last_hidden_state.flatten(0, 1)[index]  # [M, H]: only positions predicting completions
        head = self.lm.get_output_embeddings()
        softcap = getattr(self.lm.config, "final_logit_softcapping", None)
        token_logp = chunked_token_logprobs(hidden, targets, head.weight, head.bias, self.chunk, softcap)  # [M]
        return token_logp.new_zeros(n_rows).index_add(0, row, token_logp)  # [B]


def batch_logprobs(model: SequenceLogprobs, batch: Batch, device: torch.device) -> torch.Tensor:
    """[B] completion log-probs of a collated batch (model: a SequenceLogprobs, maybe DDP / FSDP-wrapped)."""
    b = batch.to(device)
    with autocast(device):
        return model(b.input_ids, b.attention_mask, b.position_ids, b.index, b.targets, b.row, b.n_rows)


def completion_logprobs(model, rows: list[dict], device: torch.device, chunk: int = 1024) -> torch.Tensor:
    """[B] log model(completion | prompt), summed over the completion's tokens (with gradient
    unless called under no_grad / inference_mode); rows packed, the head chunked."""
    wrapped = model if isinstance(model, SequenceLogprobs) else SequenceLogprobs(model, chunk)
    return batch_logprobs(wrapped, collate_packed(rows), device)


def full_logits_logprobs(model, rows: list[dict], device: torch.device) -> torch.Tensor:
    """[B] the same through the full [B, T, V] logits and their fp32 log-softmax: the reference the
    chunked path is tested and benchmarked against (the trainer's step before issue 12)."""
    from trainer.losses import sequence_logprobs

    input_ids, attention, labels, mask = collate(rows, device)
    with autocast(device):
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]  # [B, T-1, V]
    return sequence_logprobs(logits, labels, mask)  # [B]
