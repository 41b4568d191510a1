"""SQL an analyst reads: the generated reference (docs/sql.md) is current, every query in the README
runs and answers on a demo-like store (two rounds, chat and plain prompts, built datasets), and the
`datasets` / `dataset_rows` views hold exactly what was built."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bond_data import build, catalog, sqldoc
from bond_data.files import folder_sha256
from bond_data.prompts import add_prompts
from bond_data.store import Store, read_only_query

from testutil import run_generation, run_scoring, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, untrained_model):
    """Rounds 0 and 1 (k = 8, the demo's), each scored and built with n = 2; one chat prompt, and one
    prompt whose pool has no spread (as the tiny task has)."""
    tmp = tmp_path_factory.mktemp("demo-like")
    words = ["dbca", "zyx", "hello", "qwerty", "mno", "pqrs", "abc", "edcba"]
    records = [{"prompt": f"sort: {w} ="} for w in words + ["tie"]]
    records.append({"messages": [{"role": "system", "content": "sort letters"}, {"role": "user", "content": "kite"}]})
    st = Store(tmp / "store")
    anchor_hash = folder_sha256(untrained_model)
    st.register_anchor(0, str(untrained_model), anchor_hash)
    add_prompts(st, write_jsonl(tmp / "prompts.jsonl", records))
    for t in (0, 1):
        if t:
            st.register_anchor(1, str(untrained_model), anchor_hash, parent_round=0)
        run_generation(st, k=8, round_=t)
        run_scoring(st, spec="rewards_for_tests:letter_count_flat_on_tie", round_=t)
        build.build_dataset(st, t, n=2)
    return st


def test_the_sql_reference_is_generated_from_the_views():
    """docs/sql.md equals what the views DESCRIBE today (every column has a meaning in sqldoc)."""
    assert sqldoc.render_fresh() == (ROOT / "docs" / "sql.md").read_text(), \
        "docs/sql.md is stale: python -m bond_data.sqldoc > docs/sql.md"


@pytest.mark.slow  # the demo-like store: two rounds generated and scored (about 30 s of CPU)
def test_every_view_column_has_a_meaning(demo_store):
    """On a populated store too (union with real dataset files): no column without a meaning."""
    for name, columns in sqldoc.describe(demo_store).items():
        for c in columns:
            assert sqldoc.meaning(name, c["column_name"])


def readme_queries() -> list[str]:
    text = (ROOT / "README.md").read_text()
    queries = re.findall(r'bond sql\s+--store \S+\s+(?:--format \w+\s+)?"([^"]+)"', text)
    queries += re.findall(r'con\.sql\("([^"]+)"\)', text)
    queries = [" ".join(q.split()) for q in queries]
    return [q for q in queries if q.split()[0].upper() in ("SELECT", "FROM", "WITH", "DESCRIBE", "SUMMARIZE")]


def test_the_readme_has_queries():
    assert len(readme_queries()) >= 8


@pytest.mark.slow
@pytest.mark.parametrize("query", readme_queries())
def test_every_readme_query_answers_on_a_demo_like_store(demo_store, query):
    table = read_only_query(demo_store, query)
    assert table.num_rows > 0, query


@pytest.mark.slow  # the demo-like store: two rounds generated and scored (about 30 s of CPU)
def test_datasets_view_holds_each_card(demo_store):
    rows = demo_store.query("SELECT * FROM datasets ORDER BY round").to_pylist()
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        card = json.loads(r["card"])
        assert (r["weighting"], r["target"], r["license"]) == ("unbiased", "anchor", "other")
        assert (r["k_min"], r["k_max"], r["ess_mean"], r["bon_reward"]) == (
            card["k_min"], card["k_max"], card["ess_mean"], card["bon_reward"]) and r["k_max"] == 8
        assert r["anchor_hash"] == demo_store.anchor(r["round"])["anchor_hash"]


@pytest.mark.slow  # the demo-like store: two rounds generated and scored (about 30 s of CPU)
def test_dataset_rows_are_the_built_files(demo_store):
    """dataset_rows, per dataset, is its Parquet file row for row, with the dataset's id and weighting."""
    for d in demo_store.query("SELECT dataset_id, path, weighting FROM datasets").to_pylist():
        got = demo_store.query("SELECT * EXCLUDE (dataset_id, weighting, target) FROM dataset_rows "
                               "WHERE dataset_id = ? ORDER BY candidate_id", [d["dataset_id"]])
        want = pq.read_table(demo_store.root / d["path"]).sort_by("candidate_id")
        assert got.column_names == want.column_names
        assert got.to_pylist() == want.to_pylist()
        assert {d["weighting"]} == set(demo_store.query("SELECT DISTINCT weighting FROM dataset_rows WHERE "
                                                        "dataset_id = ?", [d["dataset_id"]]).column(0).to_pylist())


@pytest.mark.slow  # the demo-like store: two rounds generated and scored (about 30 s of CPU)
def test_messages_are_structs_in_datasets(demo_store):
    rows = demo_store.query("SELECT messages, prompt FROM dataset_rows WHERE messages IS NOT NULL").to_pylist()
    assert len(rows) == 16  # the chat prompt's 8 candidates, in each of the two datasets
    assert rows[0]["messages"] == [{"role": "system", "content": "sort letters"}, {"role": "user", "content": "kite"}]


def test_an_older_dataset_reads_through_dataset_rows(store, tmp_path):
    """A dataset of an earlier version (messages as JSON text, no bon_weight_pool / target_logprob /
    anchor_hash, card without weighting) still reads: missing columns NULL, messages as structs."""
    rel = "datasets/round=0/old/part-0.parquet"
    (store.root / rel).parent.mkdir(parents=True)
    pq.write_table(pa.table({"prompt_id": ["p"], "candidate_id": ["c"], "prompt": ["x: y"],
                             "messages": [json.dumps([{"role": "user", "content": "y"}])], "completion": ["z"],
                             "bon_weight": [1.0], "round": pa.array([0], pa.int32())}), store.root / rel)
    with store.writing("test"):
        catalog.append(store.root, "datasets", [{
            "dataset_id": "n2-rm-old", "round": 0, "rm_id": "rm", "n": 2, "path": rel, "num_rows": 1,
            "num_prompts": 1, "card": json.dumps({"prompts": 1, "candidates": 1})}])
    (row,) = read_only_query(store, "SELECT dataset_id, weighting, messages, bon_weight, bon_weight_pool "
                                    "FROM dataset_rows").to_pylist()
    assert row == {"dataset_id": "n2-rm-old", "weighting": "pool", "messages": [{"role": "user", "content": "y"}],
                   "bon_weight": 1.0, "bon_weight_pool": None}


@pytest.mark.slow  # the demo-like store: two rounds generated and scored (about 30 s of CPU)
def test_the_duckdb_cli_reads_the_dataset_views(demo_store, tmp_path):
    import shutil
    import subprocess
    import sys

    cli = shutil.which("duckdb", path=str(Path(sys.executable).parent)) or shutil.which("duckdb")
    if cli is None:
        pytest.skip("duckdb-cli is not installed here (make setup installs it)")
    out = subprocess.run([cli, "-init", str(demo_store.root / "store.sql"), "-csv", "-c",
                          "SELECT d.round, d.weighting, count(*) AS n, round(sum(r.bon_weight) / count(*), 9) AS w "
                          "FROM datasets d JOIN dataset_rows r USING (dataset_id) GROUP BY ALL ORDER BY 1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-3:] == ["round,weighting,n,w", "0,unbiased,80,1.0", "1,unbiased,80,1.0"]
