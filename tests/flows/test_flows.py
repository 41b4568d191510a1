"""Flows under a real Prefect server: a whole curated round, the Dask runner on a 2-worker
LocalCluster, and `bond generate` killed with SIGKILL mid-run then re-run."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from prefect.client.orchestration import get_client

from bond_data.config import GenerateConfig, ScoreConfig
from bond_data.files import folder_sha256
from bond_data.store import Store
from flows.round import curate_round
from flows.stages import run_generate, run_score

from testutil import write_jsonl

pytestmark = pytest.mark.slow
REWARD = "rewards_for_tests:letter_count"


async def read_run(flow_run_id):
    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        return (await client.read_flow(run.flow_id)).name, run.state_type.value


def test_curate_round_flow_records_runs_on_the_server(prefect_server, store):
    cfgs = dict(generate=GenerateConfig(k=4, max_new_tokens=6, shard_prompts=3).model_dump(),
                score=ScoreConfig(rm=REWARD).model_dump(), build={"round": 0, "n": 4})
    state = curate_round(str(store.root), **cfgs, return_state=True)
    assert asyncio.run(read_run(state.state_details.flow_run_id)) == ("bond-curate-round", "COMPLETED")
    record = state.result()
    assert record["num_rows"] == 40 and record["num_prompts"] == 10
    assert len(store.registered_shards("candidates", 0)) == 4  # ceil(10 / 3)
    assert len(store.registered_shards("scores", 0)) == 4
    # a second run finds nothing to do and returns the same dataset
    again = curate_round(str(store.root), **cfgs)
    assert again["dataset_id"] == record["dataset_id"] and again["reused"]


def test_dask_runner_on_a_two_worker_local_cluster(prefect_server, store):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        cfg = GenerateConfig(k=3, max_new_tokens=6, shard_prompts=2, runner="dask", dask_address=cluster.scheduler_address)
        assert run_generate(str(store.root), cfg)["shards_generated"] == 5
        run_score(str(store.root), ScoreConfig(rm=REWARD, runner="dask", dask_address=cluster.scheduler_address))
        # the shards really ran in the worker processes: each loaded the model there
        loaded = client.run(lambda: len(__import__("bond_data.backends").backends._LOADED))
        assert len(loaded) == 2 and sum(loaded.values()) >= 1
    counts = store.query("SELECT count(*) c, count(DISTINCT candidate_id) d FROM candidates").to_pylist()
    assert counts == [{"c": 30, "d": 30}]
    assert store.query("SELECT count(*) c FROM scores").to_pylist() == [{"c": 30}]


def test_generate_killed_mid_run_then_rerun_leaves_a_complete_pool(prefect_server, tmp_path, untrained_model):
    store = Store(tmp_path / "store")
    store.register_anchor(0, str(untrained_model), folder_sha256(untrained_model))
    from bond_data.prompts import add_prompts

    add_prompts(store, write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"sort: {i:03d} ="} for i in range(40)]))
    cmd = [sys.executable, "-m", "flows.cli", "generate", "--store", str(store.root), "--k", "4",
           "--shard-prompts", "1", "--max-new-tokens", "48", "--max-workers", "1", "--batch-size", "4"]
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = store.root / "candidates" / "round=0"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(folder.glob("*.parquet"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(folder.glob("*.parquet")))
    assert 3 <= written < 40, "the kill must land mid-run"

    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    counts = store.query("SELECT count(*) c, count(DISTINCT candidate_id) d, count(DISTINCT prompt_id) p FROM candidates")
    assert counts.to_pylist() == [{"c": 160, "d": 160, "p": 40}]
    registered = {m["path"] for m in store.registered_shards("candidates", 0)}
    on_disk = {p.relative_to(store.root).as_posix() for p in folder.iterdir()}
    assert on_disk == registered  # no orphan or temporary file left behind
