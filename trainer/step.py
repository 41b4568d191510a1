"""One optimizer step's forward and backward: the BOND loss over a rank's micro-batches.

Torch only (no store, no config; bond_data/precision.py imports nothing heavy), so a benchmark on
a bare GPU machine imports it as it is.
"""

from __future__ import annotations

import contextlib

import torch

from bond_data.logprobs import SequenceLogprobs, batch_logprobs
from trainer.losses import jeffreys_loss
from bond_data.packing import collate_packed, collate_padded


def train_step(model, micro_batches: list[list[dict]], beta: float, gamma: float, global_rows: int, world: int,
               device: torch.device, precision: str = "auto", packing: bool = True, pack_length: int | None = None,
               self_normalize: bool = False) -> dict:
    """Forward + backward over this rank's micro-batches of rows (prompt ids, completion ids, weight,
    weight_pool, log A); losses scaled so that the summed (and DDP-averaged) gradient is that of the mean over
    the `global_rows` rows of the global batch; self_normalize: the backward term's importance weights
    normalized over each micro-batch (trainer/losses.py). `model`: a SequenceLogprobs (maybe DDP / FSDP-wrapped; a bare
    causal LM gets wrapped); `precision`: bond_data/precision.py (auto: by device)."""
    if hasattr(model, "get_decoder"):  # a bare transformers model
        model = SequenceLogprobs(model)
    totals = {"loss": 0.0, "forward": 0.0, "backward": 0.0, "anchor_kl": 0.0, "log_ratio": 0.0, "tokens": 0}
    fed = 0
    one_row = pack_length is None and getattr(getattr(model, "module", model), "varlen", False)  # DDP keeps it in .module
    for i, rows in enumerate(micro_batches):
        batch = collate_packed(rows, pack_length, one_row) if packing else collate_padded(rows)
        weight = torch.tensor([r["weight"] for r in rows], device=device, dtype=torch.float32)  # forward term
        weight_pool = torch.tensor([r["weight_pool"] for r in rows], device=device, dtype=torch.float32)  # backward
        logp_anchor = torch.tensor([r["logp_anchor"] for r in rows], device=device, dtype=torch.float32)
        with _gradient_sync(model, last=i == len(micro_batches) - 1, world=world):
            logp_policy = batch_logprobs(model, batch, device, precision)  # [B]
            terms = jeffreys_loss(logp_policy, logp_anchor, weight, beta, gamma, weight_pool, self_normalize)
            scale = len(rows) / global_rows * world
            (terms["loss"] * scale).backward()
        for k in ("loss", "forward", "backward", "anchor_kl"):
            totals[k] += float(terms[k].detach()) * scale
        totals["log_ratio"] += float((logp_policy - logp_anchor).detach().sum()) / global_rows * world
        totals["tokens"] += batch.tokens
        fed += batch.input_ids.numel()
    totals["positions"] = fed
    totals["padding"] = 1 - totals["tokens"] / fed  # share of the positions fed that were padding
    return totals


def _gradient_sync(model, last: bool, world: int):
    """Reduce gradients over processes only after the last micro-batch of a step (DDP: no_sync;
    FSDP2: set_requires_gradient_sync)."""
    if world == 1 or last:
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model.no_sync()
