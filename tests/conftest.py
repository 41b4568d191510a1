"""Shared fixtures: tiny models and stores built in code (nothing downloaded)."""

from __future__ import annotations

import os
import sys

# tests/helpers holds testutil.py and the reward callables (rewards_for_tests.py); only that folder
# goes on the path (workers too), never tests/ itself, whose bond_data/ folder would shadow the package.
HELPERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
sys.path.insert(0, HELPERS_DIR)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HELPERS_DIR, os.environ.get("PYTHONPATH")]))

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from bond_data.files import folder_sha256  # noqa: E402
from bond_data.store import Store  # noqa: E402
from testutil import write_jsonl  # noqa: E402

@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory):
    """A tiny untrained Llama + tokenizer folder: fast, and its samples vary a lot."""
    from bond_data.tasks.common import save_untrained_model

    return save_untrained_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def prompt_file(tmp_path):
    words = ["dbca", "zyx", "hello", "qwerty", "mno", "pqrs", "abc", "edcba", "kite", "lamp"]
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"sort: {w} ="} for w in words])


@pytest.fixture
def store(tmp_path, untrained_model, prompt_file):
    """A store with round 0's anchor registered and ten prompts added."""
    from bond_data.prompts import add_prompts

    st = Store(tmp_path / "store")
    st.register_anchor(0, str(untrained_model), folder_sha256(untrained_model))
    add_prompts(st, prompt_file)
    return st


@pytest.fixture
def round0(store):
    """The store with round 0 generated (k=8), scored and built (Best-of-4): what training needs."""
    from testutil import run_generation, run_scoring

    from bond_data import build

    run_generation(store, k=8, max_new_tokens=6)
    run_scoring(store)
    build.build_dataset(store, 0, n=4)
    return store
