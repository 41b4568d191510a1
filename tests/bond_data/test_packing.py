"""Packing rows into bins: every row exactly once, no bin over its capacity, never more padding than
plain first-fit decreasing, and under the issue's 10% on the GPU benchmark's micro-batches."""

import itertools
import random

import torch

from bond_data.packing import balanced_bins, collate_packed, collate_padded, pack_bins


def padded(lengths, bins):
    return len(bins) * max(sum(lengths[i] for i in b) for b in bins)


def test_balanced_bins_place_every_row_once_within_capacity_and_beat_first_fit():
    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 12))]
        capacity = rng.randint(max(lengths), 3 * max(lengths))
        bins = balanced_bins(lengths, capacity)
        assert sorted(itertools.chain(*bins)) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        assert padded(lengths, bins) <= padded(lengths, pack_bins(lengths, capacity))


def test_balanced_bins_against_the_best_partition_by_enumeration():
    """Small micro-batches: the padded positions of every way to split the rows into bins (set
    partitions, by brute force) vs the heuristic's. Measured: at most 1.7% over the optimum, 0.07% on
    average; plain first-fit decreasing at twice the longest row: 69% and 18%."""
    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for part in partitions(rest):
            yield [[first]] + part
            for k in range(len(part)):
                yield part[:k] + [[first] + part[k]] + part[k + 1 :]

    rng, ratios = random.Random(1), []
    for _ in range(60):
        lengths = [rng.randint(20, 100) for _ in range(rng.randint(2, 7))]
        capacity = 2 * max(lengths)
        best = min(padded(lengths, p) for p in partitions(list(range(len(lengths))))
                   if all(sum(lengths[i] for i in b) <= capacity for b in p))
        ratios.append(padded(lengths, balanced_bins(lengths, capacity)) / best)
    assert min(ratios) >= 1 and max(ratios) <= 1.05 and sum(ratios) / len(ratios) <= 1.01, ratios


def test_packed_padding_stays_under_ten_percent_on_the_gpu_benchmark_rows():
    """bench/train_step.py's GPU micro-batches: 16 rows, prompts 64-128 and completions 256-1024 tokens."""
    rng = random.Random(2)
    worst = 0.0
    for _ in range(50):
        rows = [{"prompt": [1] * rng.randint(64, 128), "completion": [2] * rng.randint(256, 1024)} for _ in range(16)]
        batch = collate_packed(rows)
        longest = max(len(r["prompt"]) + len(r["completion"]) for r in rows)
        assert batch.input_ids.shape[1] <= 2 * longest
        worst = max(worst, batch.padding_fraction)
    assert worst < 0.10


def reference_packed(rows, bins, width):
    """The packed layout element by element: what collate_packed vectorises."""
    input_ids, position_ids = torch.zeros(len(bins), width, dtype=torch.long), torch.zeros(len(bins), width, dtype=torch.long)
    index, targets = [], []  # index: (flat position, row)
    for p, members in enumerate(bins):
        t = 0
        for i in members:
            seq = rows[i]["prompt"] + rows[i]["completion"]
            for j, token in enumerate(seq):
                input_ids[p, t + j], position_ids[p, t + j] = token, j
            for j, token in enumerate(rows[i]["completion"]):
                index.append((p * width + t + len(rows[i]["prompt"]) - 1 + j, i))
                targets.append(token)
            t += len(seq)
        for j in range(width - t):
            position_ids[p, t + j] = j
    order = sorted(range(len(index)), key=lambda k: (index[k][1], index[k][0]))  # by row, then position
    return (input_ids, position_ids, torch.tensor([index[k][0] for k in order]), torch.tensor([targets[k] for k in order]),
            torch.tensor([index[k][1] for k in order]))


def test_collation_equals_the_element_by_element_layout():
    """collate_packed / collate_padded build their tensors with numpy in a few vectorised passes; here
    they are held to the layout written out token by token, on 200 random micro-batches (rows of one
    prompt or one completion token included), packed (balanced bins, a capacity, one row) and padded."""
    rng = random.Random(5)
    for case in range(200):
        rows = [{"prompt": [rng.randint(1, 99) for _ in range(rng.randint(1, 9))],
                 "completion": [rng.randint(1, 99) for _ in range(rng.randint(1, 12))]} for _ in range(rng.randint(1, 10))]
        lengths = [len(r["prompt"]) + len(r["completion"]) for r in rows]
        one_row, capacity = case % 3 == 0, rng.choice([None, max(lengths) + rng.randint(0, 20)])
        bins = [list(range(len(rows)))] if one_row else balanced_bins(lengths, capacity or 2 * max(lengths))
        width = max(sum(lengths[i] for i in b) for b in bins)
        batch = collate_packed(rows, capacity, one_row)
        got = (batch.input_ids, batch.position_ids, batch.index, batch.targets, batch.row)
        for a, b in zip(got, reference_packed(rows, bins, width)):
            assert torch.equal(a, b)
        assert batch.tokens == sum(lengths) and batch.attention_mask is None and batch.n_rows == len(rows)
        padded_batch = collate_padded(rows)
        want = reference_packed(rows, [[i] for i in range(len(rows))], max(lengths))
        assert torch.equal(padded_batch.input_ids, want[0])
        assert torch.equal(padded_batch.attention_mask, torch.tensor([[int(t < n) for t in range(max(lengths))] for n in lengths]))
        for a, b in zip((padded_batch.index, padded_batch.targets, padded_batch.row), want[2:]):
            assert torch.equal(a, b)
