"""The store: orphan cleanup, the SQL views and weights against numpy, read-only SQL from anywhere."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from bond_data import bon
from bond_data.store import Store, StoreError, read_only_query

from testutil import run_generation, run_scoring, tree_digest


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
    group, reward = np.array(pool["prompt_id"]), np.array(pool["reward"])
    lt, le, k = bon.empirical_counts(group, reward)
    p_lt, p_le = bon.empirical_quantiles(group, reward)
    assert (pool["lt"], pool["le"], pool["k"]) == (lt.tolist(), le.tolist(), k.tolist())
    np.testing.assert_allclose(pool["p_lt"], p_lt)
    np.testing.assert_allclose(pool["p_le"], p_le)
    np.testing.assert_allclose(pool["bon_weight"], bon.bon_weights(group, reward, 4, "unbiased"), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pool["bon_weight_pool"], bon.bon_weight(p_lt, p_le, 4), rtol=1e-12)
    np.testing.assert_allclose(pool["bon_weight_pool"], bon.bon_weights(group, reward, 4, "pool"), rtol=1e-12)
    assert bon.tie_rate(group, reward) > 0  # the case with ties
    assert min(pool["bon_weight"]) == 0 < min(pool["bon_weight_pool"])  # below rank 4: 0 unbiased, > 0 pool
    too_big = store.query("SELECT count(bon_weight) AS w, count(bon_weight_pool) AS p FROM bon_pool(7)").to_pylist()
    assert too_big == [{"w": 0, "p": 60}]  # unbiased is undefined (NULL) for n > k


@pytest.mark.parametrize("k,levels", [(2000, 40), (2000, 10**6), (64, 5)])
def test_sql_weights_equal_numpy_on_large_pools_with_ties(k, levels):
    """The SQL macro on pools far larger than a test store's: lgamma ratios against numpy."""
    from bond_data.store import POOL_VIEW

    rng = np.random.default_rng(k + levels)
    group = np.repeat(np.arange(3), k)
    reward = rng.integers(0, levels, 3 * k).astype(float)
    con = duckdb.connect()
    con.register("rows", {"round": np.zeros(3 * k, dtype=np.int32), "prompt_id": group.astype(str),
                          "candidate_id": np.arange(3 * k), "rm_id": np.full(3 * k, "rm"), "reward": reward})
    con.execute("CREATE TEMP TABLE scores AS SELECT * FROM rows")
    con.execute(POOL_VIEW)
    for n in (1, 2, 37, k):
        got = con.sql("SELECT bon_weight, bon_weight_pool FROM bon_pool($n) ORDER BY candidate_id", params={"n": n}).fetchnumpy()
        want = bon.bon_weights(group, reward, n)
        np.testing.assert_allclose(got["bon_weight"], want, rtol=1e-9, atol=1e-9, err_msg=f"n={n}")
        np.testing.assert_allclose(got["bon_weight_pool"], bon.bon_weights(group, reward, n, "pool"), rtol=1e-9,
                                   atol=1e-300)
    con.close()


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
    before = tree_digest(store.root)
    with pytest.raises(StoreError, match="read-only"):
        read_only_query(store, statement)
    assert tree_digest(store.root) == before
    assert not (tmp_path / "leak.csv").exists() and not (tmp_path / "other.duckdb").exists()


def test_sql_reads_views_from_any_directory(store, tmp_path, monkeypatch):
    run_generation(store, k=2)
    monkeypatch.chdir(tmp_path)
    table = read_only_query(store, "SELECT count(*) AS c FROM candidates JOIN prompts USING (prompt_id)")
    assert table.to_pylist() == [{"c": 20}]
    con = duckdb.connect()  # a plain DuckDB client, as the README shows
    con.execute((store.root / "store.sql").read_text())
    assert con.sql("SELECT count(*) FROM candidates").fetchall() == [(20,)]
    con.close()


def test_a_reader_held_open_never_blocks_registration_and_sees_a_snapshot(store):
    run_generation(store, k=1)
    notebook = duckdb.connect()  # the README's notebook route, left open
    notebook.execute((store.root / "store.sql").read_text())
    assert notebook.sql("SELECT count(*) FROM candidates").fetchall() == [(10,)]
    run_generation(store, k=3)  # registers while the reader is open
    assert notebook.sql("SELECT count(*) FROM candidates").fetchall() == [(10,)]  # its snapshot
    notebook.execute((store.root / "store.sql").read_text())  # re-run: the newer shards
    assert notebook.sql("SELECT count(*) FROM candidates").fetchall() == [(30,)]
    notebook.close()


def test_sql_reads_only_the_store(store, tmp_path):
    outside = tmp_path / "outside.csv"
    outside.write_text("secret\n1\n")
    for sql in [f"SELECT * FROM read_csv('{outside}')", "SELECT * FROM read_text('/etc/passwd')",
                "SELECT * FROM glob('/etc/*')"]:
        with pytest.raises(StoreError, match="SQL error"):
            read_only_query(store, sql)
    inside = read_only_query(store, f"SELECT count(*) AS n FROM read_parquet('{store.root}/prompts/*.parquet')")
    assert inside.to_pylist() == [{"n": 10}]


def test_the_pool_and_the_planner_need_no_python_copy_of_the_store(store):
    run_generation(store, k=2)
    missing = list(store.missing_samples(0, 4, batch_rows=3))  # streamed in batches of 3 prompts
    assert len(missing) == 10 and all(m["missing"] == [2, 3] for m in missing)
    assert [m["prompt_id"] for m in missing] == sorted(m["prompt_id"] for m in missing)


def test_an_older_duckdb_catalog_is_migrated_once(store, tmp_path):
    """Stores written before the manifest catalog held one `catalog.duckdb`: `bond migrate` reads it."""
    import shutil

    run_generation(store, k=1)
    legacy_root = tmp_path / "legacy"
    shutil.copytree(store.root, legacy_root, ignore=shutil.ignore_patterns("_catalog", "store.sql"))
    con = duckdb.connect(str(legacy_root / "catalog.duckdb"))
    for table, cols in [("shards", "shard_id, kind, round, rm_id, path, num_rows, sha256, manifest::JSON AS manifest, registered_at::TIMESTAMP AS registered_at"),
                        ("rounds", "round, anchor_path, anchor_hash, parent_round, config::JSON AS config, registered_at::TIMESTAMP AS registered_at"),
                        ("reward_models", "*"), ("datasets", "*")]:
        con.execute(f"CREATE TABLE {table} AS SELECT {cols} FROM read_parquet(?)",
                    [sorted(str(p) for p in (store.root / "_catalog" / table).glob("*.parquet"))])
    con.close()
    legacy = Store(legacy_root)
    with pytest.raises(StoreError, match="older version: run `bond migrate"):
        legacy.query("SELECT 1")
    from flows.cli import main

    assert main(["migrate", "--store", str(legacy_root)]) == 0
    assert legacy.query("SELECT count(*) AS n FROM candidates").to_pylist() == [{"n": 10}]
    assert legacy.anchor(0)["anchor_hash"] == store.anchor(0)["anchor_hash"]


def test_the_duckdb_cli_from_pip_reads_the_store(store, tmp_path):
    """`duckdb-cli` (1.5, what `pip install duckdb-cli` gives; a dev dependency) runs store.sql."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    cli = shutil.which("duckdb", path=str(Path(sys.executable).parent)) or shutil.which("duckdb")
    if cli is None:
        pytest.skip("duckdb-cli is not installed here (make setup installs it)")
    run_generation(store, k=2)
    run_scoring(store)
    out = subprocess.run([cli, "-init", str(store.root / "store.sql"), "-csv", "-c",
                          "SELECT count(*) AS n, round(sum(b.bon_weight) / count(*), 12) AS w, "
                          "round(sum(b.bon_weight_pool) / count(*), 12) AS wp, count(u.bon_weight) AS big "
                          "FROM bon_pool(2) b LEFT JOIN bon_pool(3) u USING (candidate_id)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-2:] == ["n,w,wp,big", "20,1.0,1.0,0"]  # n = 3 > k = 2: NULL


@pytest.mark.slow  # about 10 s here: two reward models over a generated pool
def test_pool_and_score_summaries_equal_a_loop_over_the_rows(store):
    """The figures of the generate and score stages' summary lines and Prefect artifacts."""
    import statistics

    run_generation(store, k=2, max_new_tokens=4, shard_prompts=10)
    rm_id = run_scoring(store)
    run_scoring(store, spec="rewards_for_tests:length", rm_id="len")  # another reward model is not mixed in
    rows = store.query("SELECT prompt_id, num_tokens, finish_reason FROM candidates").to_pylist()
    pool = store.pool_summary(0)
    assert pool == {"round": 0, "shards": len(store.registered_shards("candidates", 0)),
                    "prompts": len({r["prompt_id"] for r in rows}), "candidates": len(rows),
                    "tokens": sum(r["num_tokens"] for r in rows),
                    "stop": sum(r["finish_reason"] == "stop" for r in rows),
                    "length": sum(r["finish_reason"] == "length" for r in rows)}
    assert pool["candidates"] == 20 and pool["stop"] + pool["length"] == 20
    rewards = store.query("SELECT reward FROM scores WHERE rm_id = ?", [rm_id]).column("reward").to_pylist()
    summary = store.score_summary(0, rm_id)
    assert summary["scored"] == len(rewards) == 20
    assert summary["mean"] == pytest.approx(statistics.fmean(rewards))
    assert summary["std"] == pytest.approx(statistics.pstdev(rewards))
    assert (summary["min"], summary["max"]) == (min(rewards), max(rewards))
    assert store.pool_summary(1)["candidates"] == 0 and store.score_summary(1, rm_id)["scored"] == 0
