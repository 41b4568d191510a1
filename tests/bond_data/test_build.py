"""Datasets: the built weights against a naive loop, loading with `datasets`, reward-model choice."""

from __future__ import annotations

import pytest

from bond_data import build
from bond_data.store import StoreError

from testutil import REWARD, run_generation, run_scoring


def test_built_dataset_matches_brute_force_and_loads_with_datasets(store):
    import datasets

    run_generation(store, k=6)
    rm_id = run_scoring(store)
    record = build.build_dataset(store, 0, n=4)
    assert record["rm_id"] == rm_id and not record["reused"]
    path = store.root / record["path"]
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert len(ds) == 60
    for col in ["prompt_id", "candidate_id", "prompt", "completion", "reward", "p_lt", "p_le",
                "bon_weight", "anchor_logprob", "round"]:
        assert col in ds.column_names
    rows = ds.to_list()
    for r in rows:  # naive loop over each pool
        pool = [o["reward"] for o in rows if o["prompt_id"] == r["prompt_id"]]
        lt = sum(x < r["reward"] for x in pool) / len(pool)
        le = sum(x <= r["reward"] for x in pool) / len(pool)
        assert r["bon_weight"] == pytest.approx(sum(le ** (4 - i) * lt ** (i - 1) for i in range(1, 5)))
    assert (path.parent / "README.md").read_text().count("Best-of-4") >= 1
    assert build.build_dataset(store, 0, n=4)["reused"]


def test_several_reward_models_need_an_explicit_id(store):
    run_generation(store, k=2)
    run_scoring(store, REWARD)
    run_scoring(store, "rewards_for_tests:length")
    with pytest.raises(StoreError, match="several reward models"):
        build.build_dataset(store, 0, n=2)
    assert build.build_dataset(store, 0, n=2, rm_id="length")["rm_id"] == "length"
    hashes = store.query("SELECT DISTINCT rm_id, rm_hash FROM scores").to_pylist()
    assert len(hashes) == 2 and all(len(h["rm_hash"]) == 64 for h in hashes)


def test_a_round_not_fully_scored_is_refused_with_the_count(store):
    from bond_data import score, stages

    run_generation(store, k=2)  # 3 shards of 4, 4, 2 prompts
    rm_id, _, todo, prompt_files = stages.plan_score(store, 0, REWARD, None)
    store.register_shards([score.score_shard(str(store.root), todo[0], prompt_files, REWARD, rm_id)])  # 1 of 3
    unscored = 20 - todo[0]["num_rows"]
    with pytest.raises(StoreError, match=rf"round 0: 2 of 3 candidates shards \({unscored} candidates\) have no scores"):
        build.build_dataset(store, 0, n=2)
    assert store.query("SELECT count(*) AS n FROM datasets").to_pylist() == [{"n": 0}]
    assert not (store.root / "datasets").exists()
    run_scoring(store)  # scoring the rest makes the round buildable
    assert build.build_dataset(store, 0, n=2)["num_prompts"] == 10


def test_the_streamed_sql_summary_equals_numpy(store):
    import pyarrow.parquet as pq

    run_generation(store, k=6)
    run_scoring(store)
    record = build.build_dataset(store, 0, n=4)
    expected = build.dataset_summary(pq.read_table(store.root / record["path"]))
    assert record["card"].keys() == expected.keys()
    for key, value in expected.items():
        assert record["card"][key] == pytest.approx(value, rel=1e-12), key
