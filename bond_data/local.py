"""A round's data stages in one process, without Prefect: what the flows do, for notebooks,
benchmarks and tests. The flows (flows/stages.py) add fan-out, retries and run tracking."""

from __future__ import annotations

from bond_data import build, generate, score
from bond_data.store import Store


def generate_round(store: Store, round_: int, k: int, max_new_tokens: int = 16, shard_prompts: int = 32,
                   batch_size: int = 64, temperature: float = 1.0, top_p: float = 1.0) -> int:
    """Generate the round's missing candidates from its registered anchor; return shards written."""
    anchor = store.anchor(round_)
    sampling = generate.Sampling(temperature, top_p, max_new_tokens)
    plans = generate.plan_generation(store, round_, k, shard_prompts)
    for plan in plans:
        store.register_shards([generate.generate_shard(str(store.root), plan, anchor, "transformers", sampling, batch_size)])
    return len(plans)


def score_round(store: Store, round_: int, spec: str, rm_id: str | None = None, batch_size: int = 32) -> str:
    """Score the round's unscored shards with one reward model; return its id."""
    rid, rhash = score.describe_reward_model(spec, rm_id)
    store.register_reward_model(rid, rhash, spec)
    prompt_files = [m["path"] for m in store.registered_shards("prompts")]
    for m in score.plan_scoring(store, round_, rid):
        store.register_shards([score.score_shard(str(store.root), m, prompt_files, spec, rm_id, batch_size)])
    return rid


def curate_round(store: Store, round_: int, k: int, reward: str, n: int, max_new_tokens: int = 16) -> dict:
    """generate -> score -> build, in process; returns the dataset record."""
    generate_round(store, round_, k, max_new_tokens)
    rm_id = score_round(store, round_, reward)
    return build.build_dataset(store, round_, n, rm_id)
