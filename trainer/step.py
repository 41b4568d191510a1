"""One optimizer step's forward and backward: the BOND loss over a rank's micro-batches.

Torch only (no store, no config; bond_data/precision.py imports nothing heavy), so a benchmark on
a bare GPU machine imports it as it is.
"""

from __future__ import annotations

import contextlib

import torch

from bond_data.logprobs import SequenceLogprobs, batch_logprobs
from trainer.losses import jeffreys_loss
from bond_data.packing import collate_packed, collate_padded, to_device

SUMMED = ("loss", "forward", "backward", "anchor_kl")  # the loss terms a step sums over its micro-batches


def train_step(model, micro_batches: list[list[dict]], beta: float, gamma: float, global_rows: int, world: int,
               device: torch.device, precision: str = "auto", packing: bool = True, pack_length: int | None = None,
               self_normalize: bool = False) -> dict:
    """Forward + backward over this rank's micro-batches of rows (prompt ids, completion ids, weight,
    weight_pool, log A); losses scaled so that the summed (and DDP-averaged) gradient is that of the mean over
    the `global_rows` rows of the global batch; self_normalize: the backward term's importance weights
    normalized over each micro-batch (trainer/losses.py). The micro-batches queue their kernels
    without waiting for the device (inputs through pinned memory, the loss terms summed on the
    device), which is read once, at the end. `model`: a SequenceLogprobs (maybe DDP / FSDP-wrapped; a bare
    causal LM gets wrapped); `precision`: bond_data/precision.py (auto: by device)."""
    if hasattr(model, "get_decoder"):  # a bare transformers model
        model = SequenceLogprobs(model)
    sums = torch.zeros(len(SUMMED) + 1, device=device, dtype=torch.float64)  # SUMMED, then the log-ratio
    tokens = fed = 0
    one_row = pack_length is None and getattr(getattr(model, "module", model), "varlen", False)  # DDP keeps it in .module
    for i, rows in enumerate(micro_batches):
        batch = collate_packed(rows, pack_length, one_row) if packing else collate_padded(rows)
        columns = torch.tensor([[r[k] for r in rows] for k in ("weight", "weight_pool", "logp_anchor")], dtype=torch.float32)
        weight, weight_pool, logp_anchor = to_device(columns, device)  # forward term, backward term, log A: one copy
        with _gradient_sync(model, last=i == len(micro_batches) - 1, world=world):
            logp_policy = batch_logprobs(model, batch, device, precision)  # [B]
            terms = jeffreys_loss(logp_policy, logp_anchor, weight, beta, gamma, weight_pool, self_normalize)
            scale = len(rows) / global_rows * world
            (terms["loss"] * scale).backward()
        sums[:-1] += torch.stack([terms[k].detach() for k in SUMMED]).double() * scale
        sums[-1] += (logp_policy - logp_anchor).detach().sum().double() * (world / global_rows)
        tokens += batch.tokens
        fed += batch.input_ids.numel()
    totals = dict(zip((*SUMMED, "log_ratio"), sums.tolist()))  # the step's one wait for the device
    return {**totals, "tokens": tokens, "positions": fed,
            "padding": 1 - tokens / fed}  # padding: share of the positions fed that were padding


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
