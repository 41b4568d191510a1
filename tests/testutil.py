"""Small helpers shared by tests (tests/ is on sys.path, see conftest.py)."""

import json

from bond_data import generate, score


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


REWARD = "rewards_for_tests:letter_count"


def run_generation(store, k, round_=0, shard_prompts=4, max_new_tokens=8):
    plans = generate.plan_generation(store, round_, k, shard_prompts)
    anchor = store.anchor(round_)
    for plan in plans:
        m = generate.generate_shard(str(store.root), plan, anchor, "transformers",
                                    generate.Sampling(max_new_tokens=max_new_tokens), batch_size=16)
        store.register_shards([m])
    return plans


def run_scoring(store, spec=REWARD, round_=0, rm_id=None):
    rid, rhash = score.describe_reward_model(spec, rm_id)
    store.register_reward_model(rid, rhash, spec)
    prompt_files = [m["path"] for m in store.registered_shards("prompts")]
    for m in score.plan_scoring(store, round_, rid):
        store.register_shards([score.score_shard(str(store.root), m, prompt_files, spec, rm_id)])
    return rid
