"""Flows and analysts at once: readers never break a writer, one writer at a time, no partial builds.

Real processes: `bond generate` as a subprocess against the session's Prefect server, `bond sql`
subprocesses and a DuckDB connection held open (the README's notebook route) while it writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import pytest

from bond_data.files import folder_sha256
from bond_data.prompts import add_prompts
from bond_data.store import Store

from testutil import write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture
def big_store(tmp_path, untrained_model):
    store = Store(tmp_path / "store")
    store.register_anchor(0, str(untrained_model), folder_sha256(untrained_model))
    add_prompts(store, write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"sort: {i:03d} ="} for i in range(24)]))
    return store


def _generate(store: Store, prefect_server: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.cli", "generate", "--store", str(store.root), "--k", "4",
           "--shard-prompts", "1", "--max-new-tokens", "24", "--max-workers", "1", "--batch-size", "4"]
    return subprocess.Popen(cmd, env={**os.environ, "PREFECT_API_URL": prefect_server}, text=True, **popen)


def _sql(store: Store, query: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "sql", "--store", str(store.root), "--format", "json", query],
                          capture_output=True, text=True, timeout=120)


def _wait_for_shards(store: Store, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    folder = store.root / "candidates" / "round=0"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and len(list(folder.glob("*.parquet"))) < n:
        time.sleep(0.05)


def test_queries_and_an_open_reader_while_generate_writes(prefect_server, big_store):
    notebook = duckdb.connect()  # held open for the whole run
    notebook.execute((big_store.root / "store.sql").read_text())
    writer = _generate(big_store, prefect_server, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    counts, failures = [], []
    while writer.poll() is None:
        result = _sql(big_store, "SELECT count(*) AS n FROM candidates")
        if result.returncode != 0:
            failures.append(result.stderr)
        else:
            counts.append(json.loads(result.stdout)[0]["n"])
        notebook.execute((big_store.root / "store.sql").read_text())  # refresh the notebook's snapshot
        counts.append(notebook.sql("SELECT count(*) FROM candidates").fetchall()[0][0])
    output = writer.stdout.read()
    assert writer.returncode == 0, output
    assert failures == []
    assert len(counts) >= 4 and counts == sorted(counts), counts  # never down
    assert 0 < counts[-1] <= 96 and len(set(counts)) >= 2  # the queries ran while shards arrived
    final = _sql(big_store, "SELECT count(*) AS n, count(DISTINCT candidate_id) AS d FROM candidates")
    assert json.loads(final.stdout) == [{"n": 96, "d": 96}]
    notebook.close()


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(prefect_server, big_store):
    first = _generate(big_store, prefect_server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_shards(big_store, 2, first)
        assert first.poll() is None, "the first writer must still be running"
        second = _generate(big_store, prefect_server, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2
        assert f"pid {first.pid}" in err and "being written by `bond generate --store " in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = _generate(big_store, prefect_server, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    counts = big_store.query("SELECT count(*) AS n, count(DISTINCT candidate_id) AS d FROM candidates").to_pylist()
    assert counts == [{"n": 96, "d": 96}]
