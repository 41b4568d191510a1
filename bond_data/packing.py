"""Rows -> model inputs with little padding: several (prompt, completion) rows share one packed row.

A micro-batch of rows is packed into P bins no wider than twice its longest row (or `pack_length`
tokens), P and the width chosen to leave the least padding (`balanced_bins`: first-fit decreasing
into the narrowest width that still needs only P bins, MULTIFIT, for the fewest bins first-fit
decreasing needs and one or two more). Plain first-fit decreasing into bins of twice the longest row
left 11% padding at 16 rows of 320-1150 tokens (bench/train_step.py's GPU rows) and 16% at 8; the
balanced bins leave 3.5% (at most 7.6% over 100 random micro-batches) and 5.4%. The price of
packing: attention over a packed row costs its width squared with a dense mask (SDPA), masked blocks
included, so attention FLOPs grow up to 2x; flex attention skips masked blocks. Inside a bin
the position ids restart at 0 for every row and no attention mask is passed: transformers then
builds a block-diagonal causal mask from the position ids (masking_utils.find_packed_sequence_indices),
so a row never attends to its neighbour. The bin's tail is padding with positions 0.. of its own.

Both layouts (packed, or right-padded as before with an attention mask) come out as one `Batch`
that also says which hidden states predict completion tokens: `index` [M] into the flattened
[P * L] positions, `targets` [M] the tokens they predict, `row` [M] the row each belongs to. Only
those M positions go through the LM head (bond_data/logprobs.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [P, L]
    attention_mask: torch.Tensor | None  # [P, L] for padded rows; None when packed (positions carry it)
    position_ids: torch.Tensor | None  # [P, L] restarting at 0 per packed row; None when padded
    index: torch.Tensor  # [M] flat positions (p * L + t) whose next token is a completion token
    targets: torch.Tensor  # [M] that next token
    row: torch.Tensor  # [M] which input row (0..n_rows-1) it belongs to
    n_rows: int
    tokens: int  # real tokens fed (prompt + completion of every row)
    cu_seqlens: torch.Tensor | None = None  # [S + 1] int32 row starts over the flat [P * L] positions; packed only
    longest: int = 0  # the longest of those rows (bond_data/attention.py's variable-length kernel takes both)

    @property
    def padding_fraction(self) -> float:
        """Share of the fed positions [P * L] that are padding."""
        return 1.0 - self.tokens / self.input_ids.numel()

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else to_device(t, device)
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.position_ids), move(self.index),
                     move(self.targets), move(self.row), self.n_rows, self.tokens, move(self.cu_seqlens), self.longest)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without making the CPU wait for the device: to CUDA through pinned
    memory, asynchronously (a copy from pageable memory, or one with non_blocking=False, waits for
    every kernel queued before it, so the GPU would idle while the next micro-batch is collated)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` grouped into bins whose lengths sum to <= capacity
    (a longer item gets a bin of its own)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b, r in enumerate(room) if r >= lengths[i]), None)
        if b is None:
            bins.append([i])
            room.append(capacity - lengths[i])
        else:
            bins[b].append(i)
            room[b] -= lengths[i]
    return bins


def balanced_bins(lengths: list[int], capacity: int, extra_bins: int = 2) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity` (or the longest item, if longer) so that the
    packed rows, all as wide as the fullest bin, carry the least padding: for each bin count P from
    the fewest first-fit decreasing needs at `capacity` to `extra_bins` more, binary-search the
    narrowest width into which first-fit decreasing still fits P bins (MULTIFIT), and keep the layout
    with the fewest padded positions P * width (first-fit decreasing at `capacity` itself included)."""
    def padded(bins):
        return len(bins) * max(sum(lengths[i] for i in b) for b in bins)

    longest, total = max(lengths), sum(lengths)
    capacity = max(capacity, longest)
    best = pack_bins(lengths, capacity)  # fits len(best) <= p bins at width `capacity`: the search's upper end
    for p in range(len(best), min(len(lengths), len(best) + extra_bins) + 1):
        lo, hi = max(longest, -(-total // p)), capacity
        if lo > hi:
            continue
        while lo < hi:  # the narrowest width first-fit decreasing packs into p bins
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if len(pack_bins(lengths, mid)) <= p else (mid + 1, hi)
        bins = pack_bins(lengths, lo)
        if padded(bins) < padded(best):
            best = bins
    return best


def _tokens(rows: list[dict], order) -> np.ndarray:
    """The prompt + completion ids of rows[i] for i in `order`, end to end (one pass over the ints:
    torch.tensor on Python lists costs ~10x more, which was most of a micro-batch's collation)."""
    parts = itertools.chain.from_iterable(itertools.chain(rows[i]["prompt"], rows[i]["completion"]) for i in order)
    return np.fromiter(parts, dtype=np.int64)


def _ramps(lengths) -> np.ndarray:
    """0, 1, ..., n - 1 for each n of `lengths`, end to end."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _completion_targets(rows: list[dict], starts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat positions predicting each completion token (position t predicts token t + 1), the tokens
    they predict and the row each belongs to, given each row's first flat position."""
    prompt = np.array([len(r["prompt"]) for r in rows], dtype=np.int64)
    completion = np.array([len(r["completion"]) for r in rows], dtype=np.int64)
    index = np.repeat(np.asarray(starts, dtype=np.int64) + prompt - 1, completion) + _ramps(completion)
    targets = np.fromiter(itertools.chain.from_iterable(r["completion"] for r in rows), dtype=np.int64)
    row = np.repeat(np.arange(len(rows)), completion)
    return torch.from_numpy(index), torch.from_numpy(targets), torch.from_numpy(row)


def collate_packed(rows: list[dict], capacity: int | None = None, one_row: bool = False) -> Batch:
    """Pack rows into bins of at most `capacity` tokens (default: twice the longest row) on the CPU,
    balanced to leave the least padding (`balanced_bins`); the packed rows are as wide as the fullest bin.
    `one_row`: every row in one bin, no padding (for variable-length attention, whose cost does not
    grow with the bin's width: bond_data/attention.py)."""
    lengths = [len(r["prompt"]) + len(r["completion"]) for r in rows]
    longest = max(lengths)
    bins = [list(range(len(rows)))] if one_row else balanced_bins(lengths, max(longest, capacity or 2 * longest))
    width = max(sum(lengths[i] for i in b) for b in bins)  # the fullest bin, at most the capacity
    input_ids = np.zeros((len(bins), width), dtype=np.int64)
    position_ids = np.zeros((len(bins), width), dtype=np.int64)
    starts = np.zeros(len(rows), dtype=np.int64)
    for p, members in enumerate(bins):
        sizes = [lengths[i] for i in members]
        used = sum(sizes)
        input_ids[p, :used] = _tokens(rows, members)
        position_ids[p] = _ramps([*sizes, width - used])  # the tail: a padding "row" of its own
        starts[members] = p * width + np.cumsum(sizes) - sizes
    index, targets, row = _completion_targets(rows, starts)
    position_ids = torch.from_numpy(position_ids)
    cu_seqlens, widest = segments(position_ids)
    return Batch(torch.from_numpy(input_ids), None, position_ids, index, targets, row, len(rows), sum(lengths),
                 cu_seqlens, widest)


def segments(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [S + 1], longest row) of packed [P, L] position ids: a row starts wherever its
    position id is 0 (a bin's padding tail counts as a row of its own, as in transformers' SDPA mask)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


def collate_padded(rows: list[dict]) -> Batch:
    """One right-padded row per input row, with an attention mask (the layout before packing)."""
    lengths = [len(r["prompt"]) + len(r["completion"]) for r in rows]
    width = max(lengths)
    input_ids = np.zeros((len(rows), width), dtype=np.int64)
    for b, n in enumerate(lengths):
        input_ids[b, :n] = _tokens(rows, [b])
    attention = torch.from_numpy((np.arange(width) < np.array(lengths)[:, None]).astype(np.int64))
    index, targets, row = _completion_targets(rows, np.arange(len(rows)) * width)
    return Batch(torch.from_numpy(input_ids), attention, None, index, targets, row, len(rows), sum(lengths))
