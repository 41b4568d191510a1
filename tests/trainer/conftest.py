"""Fixtures the trainer's tests share."""

from __future__ import annotations

import pytest

from bond_data import build
from testutil import run_generation, run_scoring


@pytest.fixture
def round0(store):
    run_generation(store, k=8, max_new_tokens=6)
    run_scoring(store)
    build.build_dataset(store, 0, n=4)
    return store
