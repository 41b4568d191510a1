"""Datasets: the built weights against a naive loop, loading with `datasets`, reward-model choice,
the weighting and target checks (n <= k, tempered pools), older catalog rows."""

from __future__ import annotations

import json
import math

import pytest

from bond_data import build, catalog, stages
from bond_data.backends.base import Sampling
from bond_data.store import StoreError

from testutil import REWARD, run_generation, run_scoring


def test_built_dataset_matches_brute_force_and_loads_with_datasets(store):
    import datasets

    run_generation(store, k=6)
    rm_id = run_scoring(store)
    record = build.build_dataset(store, 0, n=4)
    assert record["rm_id"] == rm_id and not record["reused"]
    assert record["weighting"] == record["card"]["weighting"] == "unbiased" and record["target"] == "anchor"
    path = store.root / record["path"]
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert len(ds) == 60
    for col in ["prompt_id", "candidate_id", "prompt", "completion", "reward", "p_lt", "p_le",
                "bon_weight", "bon_weight_pool", "anchor_logprob", "target_logprob", "round"]:
        assert col in ds.column_names
    rows = ds.to_list()
    for r in rows:  # naive loop over each pool
        pool = [o["reward"] for o in rows if o["prompt_id"] == r["prompt_id"]]
        k, lt, le = len(pool), sum(x < r["reward"] for x in pool), sum(x <= r["reward"] for x in pool)
        unbiased = k * (math.comb(le, 4) - math.comb(lt, 4)) / (math.comb(k, 4) * (le - lt))
        assert r["bon_weight"] == pytest.approx(unbiased, abs=1e-12)
        assert r["bon_weight_pool"] == pytest.approx(sum((le / k) ** (4 - i) * (lt / k) ** (i - 1) for i in range(1, 5)))
        assert r["target_logprob"] == r["anchor_logprob"]
    card = (path.parent / "README.md").read_text()
    assert card.count("Best-of-4") >= 1 and "Weighting: **unbiased**" in card and "C(le, n) - C(lt, n)" in card
    assert build.build_dataset(store, 0, n=4)["reused"]


def test_pool_and_unbiased_datasets_are_two_datasets(store):
    import pyarrow.parquet as pq

    run_generation(store, k=4)
    run_scoring(store)
    unbiased = build.build_dataset(store, 0, n=2)
    pool = build.build_dataset(store, 0, n=2, weighting="pool")
    assert unbiased["dataset_id"].startswith("n2-unbiased-") and pool["dataset_id"].startswith("n2-pool-")
    rows = {r["dataset_id"]: build.catalog_record(r) for r in store.query("SELECT * FROM datasets").to_pylist()}
    assert {d: r["weighting"] for d, r in rows.items()} == {unbiased["dataset_id"]: "unbiased", pool["dataset_id"]: "pool"}
    a, b = (pq.read_table(store.root / r["path"]).to_pydict() for r in (unbiased, pool))
    assert a["bon_weight_pool"] == b["bon_weight_pool"] == b["bon_weight"] != a["bon_weight"]
    assert "Weighting: **pool**" in (store.root / pool["path"]).with_name("README.md").read_text()
    again = build.build_dataset(store, 0, n=2, weighting="pool")
    assert again["reused"] and again["weighting"] == "pool"


def test_an_older_dataset_row_without_weighting_still_reads(store):
    """Datasets registered before weightings existed carry no weighting in their card: pool, anchor."""
    old = {"dataset_id": "n2-rm-0123456789ab", "round": 0, "rm_id": "rm", "n": 2, "path": "datasets/x/part-0.parquet",
           "num_rows": 4, "num_prompts": 2, "card": json.dumps({"prompts": 2, "candidates": 4})}
    with store.writing("test"):
        catalog.append(store.root, "datasets", [old])
    (row,) = store.query("SELECT * FROM datasets").to_pylist()
    record = build.catalog_record(row)
    assert (record["weighting"], record["target"], record["card"]["prompts"]) == ("pool", "anchor", 2)
    assert store.query("SELECT card->>'weighting' AS w FROM datasets").to_pylist() == [{"w": None}]


def test_unbiased_weights_refuse_n_above_k_and_pool_weights_build(store):
    run_generation(store, k=2)
    run_scoring(store)
    with pytest.raises(StoreError, match=r"round 0: .*smallest pool has k = 2 samples \(N = 4\); raise k .*--weighting pool"):
        build.build_dataset(store, 0, n=4)
    assert not (store.root / "datasets").exists()
    record = build.build_dataset(store, 0, n=4, weighting="pool")
    assert record["weighting"] == "pool" and record["num_rows"] == 20


def test_tempered_pools_are_refused_unless_the_target_is_the_sampler(store):
    import pyarrow.parquet as pq

    stages.generate_round(store, 0, 3, Sampling(temperature=0.7, top_p=0.9, max_new_tokens=6), 4, batch_size=16)
    run_scoring(store)
    with pytest.raises(StoreError, match=r"round 0: candidates were sampled with temperature 0.7, top_p 0.9.*--target sampler"):
        build.build_dataset(store, 0, n=2)
    record = build.build_dataset(store, 0, n=2, target="sampler")
    assert record["target"] == "sampler" and "-sampler-" in record["dataset_id"]
    rows = pq.read_table(store.root / record["path"]).to_pylist()
    sample = dict(zip(*store.query("SELECT candidate_id, sample_logprob FROM candidates").to_pydict().values()))
    assert all(r["target_logprob"] == sample[r["candidate_id"]] for r in rows)
    assert any(r["target_logprob"] != r["anchor_logprob"] for r in rows)  # the sampler is not the anchor
    assert "target | sampler" in (store.root / record["path"]).with_name("README.md").read_text()


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
    assert record["card"].keys() == expected.keys() | {"weighting", "target", "license", "anchor_hash"}
    for key, value in expected.items():
        assert record["card"][key] == pytest.approx(value, rel=1e-12), key
