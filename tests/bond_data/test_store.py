"""The store: orphan cleanup, the SQL views and weights against numpy, read-only SQL from anywhere."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from bond_data import bon
from bond_data.files import file_sha256
from bond_data.store import StoreError, read_only_query

from testutil import run_generation, run_scoring


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


def test_a_changed_reward_model_cannot_reuse_its_id(store):
    store.register_reward_model("rm", "a" * 64, "x:y")
    with pytest.raises(StoreError, match="new --rm-id"):
        store.register_reward_model("rm", "b" * 64, "x:z")


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
