"""Small helpers shared by tests (tests/ is on sys.path, see conftest.py)."""

import json

from bond_data import local


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


REWARD = "rewards_for_tests:letter_count"


def run_generation(store, k, round_=0, shard_prompts=4, max_new_tokens=8):
    return local.generate_round(store, round_, k, max_new_tokens, shard_prompts, batch_size=16)


def run_scoring(store, spec=REWARD, round_=0, rm_id=None):
    return local.score_round(store, round_, spec, rm_id)
