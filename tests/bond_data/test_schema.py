"""Identity: ids and seeds are pure functions of content and position, stable across versions."""

from __future__ import annotations

import hashlib

from bond_data import schema


def test_candidate_seed_is_the_documented_hash():
    """A stored candidate is reproducible only if its seed never changes: pin the formula."""
    digest = hashlib.sha256("seed\x000\x00abc\x003".encode()).digest()
    assert schema.candidate_seed(0, "abc", 3) == int.from_bytes(digest[:8], "little") & (2**63 - 1)


def test_seeds_are_distinct_and_63_bit():
    seeds = {schema.seed63("online", 0, step, slot, slot % 3, role, s)
             for step in range(5) for slot in range(6) for role in ("policy", "anchor") for s in range(2)}
    assert len(seeds) == 5 * 6 * 2 * 2 and all(0 <= s < 2**63 for s in seeds)


def test_prompt_ids_tag_text_and_chat():
    chat = [{"role": "user", "content": "hi"}]
    assert schema.prompt_id("hi", None) != schema.prompt_id(None, chat)
    assert schema.prompt_id(None, chat) == schema.prompt_id(None, [{"content": "hi", "role": "user", "x": 1}])
    assert schema.candidate_id(0, "p", 1) != schema.candidate_id(1, "p", 1)
