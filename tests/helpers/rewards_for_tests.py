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
