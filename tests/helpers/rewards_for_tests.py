"""Reward callables the tests pass as `rewards_for_tests:NAME` (tests/ is on PYTHONPATH)."""

import math


def letter_count(batch):
    """Discrete, with ties and spread: how many distinct letters a-z the completion holds, mod 4."""
    return [float(len({ch for ch in c if "a" <= ch <= "z"}) % 4) for _, c in batch]


def letter_count_flat_on_tie(batch):
    """letter_count, except 1.0 for every completion of a prompt holding "tie": a pool with no spread."""
    return [1.0 if "tie" in p else r for (p, _), r in zip(batch, letter_count(batch))]


def length(batch):
    return [float(len(c)) for _, c in batch]


def nan_on_third(batch):
    """Valid except for the third pair it is ever asked about in a batch: must be caught."""
    return [math.nan if i == 2 else 1.0 for i, _ in enumerate(batch)]


def raises(batch):
    raise ZeroDivisionError("the reward model's own bug")


def returns_none(batch):
    return None


def returns_scalar(batch):
    return 0.5


def one_too_few(batch):
    return [1.0] * (len(batch) - 1)


def strings(batch):
    return ["0.5"] * len(batch)


def booleans(batch):
    return [True] * len(batch)


def slow_letter_count(batch):
    """letter_count, slowly (a kill lands mid-run)."""
    import time

    time.sleep(0.4)
    return letter_count(batch)


OOM_MESSAGE = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
               "3.12 GiB is free. Including non-PyTorch memory, this process has 76.06 GiB memory in use. Of the "
               "allocated memory 74.10 GiB is allocated by PyTorch, and 1.35 GiB is reserved by PyTorch but "
               "unallocated. If reserved but unallocated memory is large try setting "
               "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")


def out_of_memory_past_the_check(batch):
    """As a reward model on a GPU too small for its batch: fine on the 2 rows the pre-run check
    scores, torch's OutOfMemoryError (its CUDA message) on the run's real batches."""
    import os

    import torch

    if os.environ.get("BOND_TEST_CALLS"):  # the batch sizes it was called with, one line each
        with open(os.environ["BOND_TEST_CALLS"], "a") as f:
            f.write(f"{len(batch)}\n")
    if len(batch) > 2:
        raise torch.OutOfMemoryError(OOM_MESSAGE)
    return letter_count(batch)
