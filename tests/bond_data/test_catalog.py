"""The catalog on disk: append-only manifests, compaction that loses nothing, the writer lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from bond_data import catalog
from bond_data.store import Store, StoreError


def _shard(i: int) -> dict:
    return {"shard_id": f"s{i}", "kind": "test",  # no view reads kind "test"
            "round": 0, "rm_id": None, "path": f"candidates/s{i}.parquet",
            "num_rows": 10, "sha256": "0" * 64, "manifest": "{}"}


def test_a_registration_is_one_new_file_and_readers_keep_the_first(tmp_path):
    st = Store(tmp_path)
    with st.writing("test"):
        before = set(catalog.table_dir(st.root, "shards").iterdir())
        catalog.append(st.root, "shards", [_shard(1), _shard(2)])
        catalog.append(st.root, "shards", [{**_shard(1), "num_rows": 99}])  # a second registration of s1
    added = set(catalog.table_dir(st.root, "shards").iterdir()) - before
    assert len(added) == 2 and all("-batch-" in p.name for p in added)
    rows = st.query("SELECT shard_id, num_rows FROM shards ORDER BY shard_id").to_pylist()
    assert rows == [{"shard_id": "s1", "num_rows": 10}, {"shard_id": "s2", "num_rows": 10}]


def test_compaction_keeps_every_row_once_and_deletes_only_after_the_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "COMPACT_AFTER", 3)  # 3 batches -> a segment
    monkeypatch.setattr(catalog, "MERGE_AFTER", 2)  # 2 segments -> a new base
    st = Store(tmp_path)
    folder = catalog.table_dir(st.root, "shards")
    seen = []
    with st.writing("test"):
        for i in range(14):
            catalog.append(st.root, "shards", [_shard(i)])
            seen.append(st.query("SELECT count(*) AS n, count(DISTINCT shard_id) AS d FROM shards").to_pylist()[0])
    assert seen == [{"n": i + 1, "d": i + 1} for i in range(14)]  # every row once, at every step
    bases = sorted(folder.glob("*-base.parquet"), key=catalog._ns)
    assert len(bases) == 3  # the empty one, then merges after 6 and 12 batches; nothing deleted yet
    assert len(list(folder.glob("*-segment.parquet"))) == 4 and len(list(folder.glob("*-batch-*.parquet"))) == 14
    assert sorted(pq.read_table(bases[-1]).column("shard_id").to_pylist()) == sorted(f"s{i}" for i in range(12))
    catalog.compact(st.root, "shards", grace=0.0)  # past the grace: everything covered goes
    assert [p.name.endswith("-base.parquet") for p in folder.iterdir()] == [True]
    assert st.query("SELECT count(*) AS n FROM shards").to_pylist() == [{"n": 14}]


HOLD = """
import sys, time
from pathlib import Path
from bond_data.catalog import writer_lease
with writer_lease(Path(sys.argv[1]), "bond generate --round 0"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_one_writer_at_a_time_and_a_killed_writer_leaves_no_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match=rf"being written by `bond generate --round 0` \(host .*, pid {holder.pid}, since "):
            with Store(tmp_path).writing("second"):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        start = time.perf_counter()
        with Store(tmp_path).writing("after the kill"):  # the kernel dropped the lock with the process
            assert catalog.holds_lease(tmp_path.resolve())
        assert time.perf_counter() - start < 5
    finally:
        holder.kill()
    assert not catalog.holds_lease(tmp_path.resolve())


def test_the_lease_is_reentrant_within_a_process(tmp_path):
    st = Store(tmp_path)
    with st.writing("outer"):
        with st.writing("inner"):
            pass
        assert catalog.holds_lease(st.root)
    assert not catalog.holds_lease(st.root)
