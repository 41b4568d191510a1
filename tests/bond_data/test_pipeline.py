"""The data side of a round without Prefect: generate, score, build, SQL, on real files."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from bond_data import bon, build, generate, score
from bond_data.store import StoreError, file_sha256, read_only_query

from testutil import REWARD, run_generation, run_scoring


def test_generation_is_complete_unique_and_resumable(store):
    run_generation(store, k=3)
    rows = store.query("SELECT candidate_id, prompt_id, sample_index FROM candidates").to_pylist()
    assert len(rows) == 10 * 3 and len({r["candidate_id"] for r in rows}) == 30
    assert generate.plan_generation(store, 0, 3, 4) == []  # done shards are skipped
    plans = generate.plan_generation(store, 0, 5, 4)  # raising k plans only indices 3 and 4
    assert all(j["sample_indices"] == [3, 4] for p in plans for j in p["jobs"])
    assert run_generation(store, k=5) == len(plans)
    counts = store.query("SELECT prompt_id, count(*) n, count(DISTINCT sample_index) d FROM candidates GROUP BY 1").to_pylist()
    assert {(c["n"], c["d"]) for c in counts} == {(5, 5)}


def test_candidates_carry_lineage_and_logprobs(store):
    run_generation(store, k=2)
    row = store.query("SELECT * FROM candidates LIMIT 1").to_pylist()[0]
    assert row["anchor_hash"] == store.anchor(0)["anchor_hash"]
    assert row["backend"] == "transformers" and json.loads(row["sampling"])["temperature"] == 1.0
    assert row["num_tokens"] == len(row["token_ids"]) > 0
    assert row["finish_reason"] in ("stop", "length")
    assert row["anchor_logprob"] < 0 and row["anchor_logprob"] == pytest.approx(row["sample_logprob"])


def test_a_shard_regenerates_identically(store):
    plan = generate.plan_generation(store, 0, 3, 4)[0]
    sampling = generate.Sampling(max_new_tokens=8)
    m1 = generate.generate_shard(str(store.root), plan, store.anchor(0), "transformers", sampling, batch_size=5)
    first = pq.read_table(store.root / m1["path"]).to_pylist()
    m2 = generate.generate_shard(str(store.root), plan, store.anchor(0), "transformers", sampling, batch_size=16)
    second = pq.read_table(store.root / m2["path"]).to_pylist()
    # Seeds do not depend on batching: the same tokens. Log-probs differ only by float rounding
    # (padding changes the matmul shapes).
    for a, b in zip(first, second, strict=True):
        assert a["token_ids"] == b["token_ids"] and a["completion"] == b["completion"] and a["seed"] == b["seed"]
        assert a["anchor_logprob"] == pytest.approx(b["anchor_logprob"], rel=1e-4)


def test_orphan_and_temporary_files_are_removed(store):
    run_generation(store, k=1)
    folder = store.root / "candidates" / "round=0"
    (folder / "shard=killed.parquet").write_bytes(b"half")
    (folder / ".shard=x.parquet.tmp-1234").write_bytes(b"half")
    removed = store.remove_orphans("candidates/round=0")
    assert {p.name for p in removed} == {"shard=killed.parquet", ".shard=x.parquet.tmp-1234"}
    assert store.query("SELECT count(*) c FROM candidates").to_pylist()[0]["c"] == 10


def test_sql_weights_equal_the_pure_module(store):
    run_generation(store, k=6)
    run_scoring(store)
    pool = store.query("SELECT * FROM bon_pool(4) ORDER BY candidate_id").to_pydict()
    p_lt, p_le = bon.empirical_quantiles(np.array(pool["prompt_id"]), np.array(pool["reward"]))
    np.testing.assert_allclose(pool["p_lt"], p_lt)
    np.testing.assert_allclose(pool["p_le"], p_le)
    np.testing.assert_allclose(pool["bon_weight"], bon.bon_weight(p_lt, p_le, 4), rtol=1e-12)
    assert bon.tie_rate(np.array(pool["prompt_id"]), np.array(pool["reward"])) > 0  # the case with ties


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


def test_a_nan_reward_names_the_candidate_and_writes_nothing(store):
    run_generation(store, k=3)
    with pytest.raises(score.RewardError, match=r"nan for candidate [0-9a-f]{16}"):
        run_scoring(store, "rewards_for_tests:nan_on_third")
    assert not (store.root / "scores").exists() or not list((store.root / "scores").rglob("*.parquet"))
    assert store.registered_shards("scores") == []


def test_a_changed_reward_model_cannot_reuse_its_id(store):
    store.register_reward_model("rm", "a" * 64, "x:y")
    with pytest.raises(StoreError, match="new --rm-id"):
        store.register_reward_model("rm", "b" * 64, "x:z")


def test_sequence_classification_reward_model(store, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(store.anchor(0)["anchor_path"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    rm_dir = tmp_path / "rm"
    LlamaForSequenceClassification(cfg).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    run_generation(store, k=2)
    rm_id = run_scoring(store, str(rm_dir))
    rewards = store.query("SELECT reward FROM scores WHERE rm_id = ?", [rm_id]).column("reward").to_pylist()
    assert rm_id == "rm" and len(rewards) == 20 and len(set(rewards)) > 5


def test_length_sorted_scoring_keeps_input_order():
    pairs = [("p", "x" * n) for n in [5, 1, 9, 3, 7, 2]]
    calls = []

    def fn(batch):
        calls.append([len(c) for _, c in batch])
        return [float(len(c)) for _, c in batch]

    assert score.score_pairs(fn, pairs, batch_size=2) == [5, 1, 9, 3, 7, 2]
    assert calls == [[1, 2], [3, 5], [7, 9]]


@pytest.mark.parametrize("statement", [
    "INSERT INTO rounds (round, anchor_path, anchor_hash) VALUES (9, 'x', 'y')",
    "CREATE TABLE t AS SELECT 1",
    "DROP VIEW pool",
    "COPY (SELECT 1) TO 'leak.csv'",
    "ATTACH 'other.duckdb' AS o",
    "SELECT 1; DELETE FROM shards",
])
def test_sql_refuses_writes_and_changes_nothing(store, statement, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = file_sha256(store.catalog_path)
    with pytest.raises(StoreError, match="read-only"):
        read_only_query(store, statement)
    assert file_sha256(store.catalog_path) == before
    assert not (tmp_path / "leak.csv").exists() and not (tmp_path / "other.duckdb").exists()


def test_sql_reads_views_from_any_directory(store, tmp_path, monkeypatch):
    run_generation(store, k=2)
    monkeypatch.chdir(tmp_path)
    table = read_only_query(store, "SELECT count(*) AS c FROM candidates JOIN prompts USING (prompt_id)")
    assert table.to_pylist() == [{"c": 20}]
    con = duckdb.connect(str(store.catalog_path), read_only=True)  # a plain DuckDB client can open it
    con.execute("SET file_search_path = ?", [str(store.root)])
    assert con.sql("SELECT count(*) FROM candidates").fetchall() == [(20,)]
    con.close()
