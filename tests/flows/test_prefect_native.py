"""Prefect as a user sees it, against a real Prefect server: run names, tags and artifacts read back
through the client; retries of transient failures only; a deployment on a process work pool run by
a worker from another directory; and Prefect's own CLI listings."""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterTags,
                                            TaskRunFilter, TaskRunFilterName)

import bond_data.generate
from bond_data.config import BuildConfig, GenerateConfig, ScoreConfig
from bond_data.store import StoreError
from flows.round import bond_rounds
from flows.stages import artifact_key, run_generate
from testutil import REWARD
from trainer.config import TrainConfig

pytestmark = pytest.mark.slow

TRAIN = TrainConfig(micro_batch_size=8, epochs=1, checkpoint_every=4, lr=1e-3).model_dump()
PARAMS = dict(generate=GenerateConfig(k=4, max_new_tokens=6, shard_prompts=5).model_dump(),
              score=ScoreConfig(rm=REWARD).model_dump(), build=BuildConfig(n=2).model_dump(), train=TRAIN)


def read_runs(tag: str):
    """Flow runs carrying a tag: {name: (state, tags, flow run)}; and every task run of those."""
    async def go():
        async with get_client() as client:
            flow_runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
            task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [r.id for r in flow_runs]}))
            return flow_runs, task_runs
    return asyncio.run(go())


def read_artifacts(*keys: str) -> dict:
    async def go():
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys))))
            return {a.key: a for a in found}
    return asyncio.run(go())


def test_rounds_name_tag_and_report_every_run(prefect_server, store):
    done = bond_rounds(str(store.root), 1, **PARAMS)
    flow_runs, task_runs = read_runs(f"store:{store.root}")
    names = {r.name: r for r in flow_runs}
    assert set(names) == {"round-0", "curate-r0", "generate-r0", "score-r0-letter_count", "build-r0-n2"}
    assert all("round:0" in r.tags and r.state_type.value == "COMPLETED" for r in flow_runs)
    shards = {m["shard_id"] for m in store.registered_shards("candidates", 0)}
    # a subflow call also leaves a task run in its parent, named after the subflow's flow (`bond-build-0`)
    task_names = sorted(r.name for r in task_runs if not r.name.startswith("bond-"))
    assert task_names == sorted([f"generate-{s}" for s in shards] + [f"score-{s}-letter_count" for s in shards]
                                + ["train-r0", "report-r0"])
    assert all(f"store:{store.root}" in r.tags and "round:0" in r.tags for r in task_runs)

    stages = ("generate-r0", "score-r0-letter-count", "build-r0-n2", "train-r0", "round-0")
    keys = {s: artifact_key(store.root, s) for s in stages}
    assert re.fullmatch(r"store-[0-9a-f]{6}-score-r0-letter-count", keys["score-r0-letter-count"])
    artifacts = read_artifacts(*keys.values())
    assert set(artifacts) == set(keys.values())
    table = {s: {row["metric"]: row["value"] for row in json.loads(artifacts[keys[s]].data)}
             for s in stages[:4]}
    pool = store.query("SELECT count(*) AS c, sum(num_tokens)::BIGINT AS t FROM candidates").to_pylist()[0]
    assert table["generate-r0"]["candidates"] == pool["c"] == 40 and table["generate-r0"]["completion tokens"] == pool["t"]
    scored = store.query("SELECT reward FROM scores").column("reward").to_pylist()
    rewards = {"m": statistics.fmean(scored), "s": statistics.pstdev(scored)}
    assert table["generate-r0"]["finished with EOS (stop)"] + table["generate-r0"]["cut at max_new_tokens (length)"] == 40
    assert table["score-r0-letter-count"]["reward mean"] == pytest.approx(rewards["m"], abs=1e-4)
    assert table["score-r0-letter-count"]["reward std"] == pytest.approx(rewards["s"], abs=1e-4)
    assert table["build-r0-n2"]["dataset"] == done[0]["dataset_id"] and table["build-r0-n2"]["candidates"] == 40
    assert table["train-r0"]["next anchor"] == store.anchor(1)["anchor_hash"][:12] and table["train-r0"]["steps"] >= 1
    report = artifacts[keys["round-0"]].data
    assert artifacts[keys["round-0"]].type == "markdown" and done[0]["dataset_id"] in report
    for line in (f"| generate | candidates | {pool['c']} |", f"| score | reward mean | {round(rewards['m'], 4)} |",
                 "| build | candidates | 40 |",
                 f"| train | steps | {table['train-r0']['steps']} |"):
        assert line in report, line


@pytest.fixture
def flaky_write(monkeypatch):
    """The Parquet write of generation fails once with `error`, then works; calls counted."""
    calls = []
    real = bond_data.generate.write_parquet_atomic

    def install(error: Exception):
        def write(*args, **kwargs):
            calls.append(error)
            if len(calls) == 1:
                raise error
            return real(*args, **kwargs)
        monkeypatch.setattr(bond_data.generate, "write_parquet_atomic", write)
        return calls
    return install


def shard_task_runs(store) -> list:
    async def go():
        async with get_client() as client:
            return await client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="generate-r0-")),
                                               flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"store:{store.root}"])))
    return asyncio.run(go())


def test_a_transient_failure_is_retried_and_the_round_completes(prefect_server, store, flaky_write):
    calls = flaky_write(OSError(28, "No space left on device"))
    cfg = GenerateConfig(k=2, max_new_tokens=4, shard_prompts=10, retry_delay_s=0.1)
    assert run_generate(str(store.root), cfg)["shards_generated"] == 1
    assert len(calls) == 2  # failed once, retried once
    assert store.query("SELECT count(*) AS c FROM candidates").to_pylist() == [{"c": 20}]
    [run] = shard_task_runs(store)
    assert run.run_count == 2 and run.state_type.value == "COMPLETED"


def test_a_user_error_fails_once_and_is_not_retried(prefect_server, store, flaky_write):
    calls = flaky_write(StoreError("shard file outside the store"))
    cfg = GenerateConfig(k=2, max_new_tokens=4, shard_prompts=10, retry_delay_s=0.1)
    with pytest.raises(StoreError, match="outside the store"):
        run_generate(str(store.root), cfg)
    assert len(calls) == 1
    [run] = shard_task_runs(store)
    assert run.run_count == 1 and run.state_type.value == "FAILED"
    assert store.registered_shards("candidates", 0) == []


def test_a_shard_past_its_timeout_fails_and_is_retried(prefect_server, store, monkeypatch):
    """Prefect enforces a sync task's timeout when its thread next runs Python code (it cannot cut a
    blocked call short): the shard stuck 4 s past a 1 s timeout fails as timed out, and is retried."""
    import time

    calls = []
    real = bond_data.generate.write_parquet_atomic

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(4)
        return real(*args, **kwargs)

    monkeypatch.setattr(bond_data.generate, "write_parquet_atomic", write)
    cfg = GenerateConfig(k=2, max_new_tokens=4, shard_prompts=10, retry_delay_s=0.1, shard_timeout_s=1)
    assert run_generate(str(store.root), cfg)["shards_generated"] == 1
    assert len(calls) == 2
    [run] = shard_task_runs(store)
    assert run.run_count == 2 and run.state_type.value == "COMPLETED"
    assert store.query("SELECT count(*) AS c FROM candidates").to_pylist() == [{"c": 20}]


def prefect_cli(args: list[str], server: str, cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    """Prefect's own command line in this venv, against the test server; wide enough not to elide."""
    env = {**os.environ, "PREFECT_API_URL": server, "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_prefect_cli_listings_work(prefect_server, store, tmp_path):
    """`prefect flow-run ls` and friends failed with HTTP 422 (fastapi 0.151+ and Prefect 3.8's
    null `limit`): each one exits 0 and lists what this test made."""
    from flows.round import rounds_deployment

    run_generate(str(store.root), GenerateConfig(k=1, max_new_tokens=2))
    rounds_deployment(str(store.root), None, 1, **PARAMS, name="listed").apply()
    made = prefect_cli(["work-pool", "create", "--type", "process", "bond-listed-pool"], prefect_server, tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    expected = {"flow-run": "generate-r0", "flow": "bond-generate", "deployment": "bond-rounds/listed",
                "artifact": artifact_key(store.root, "generate-r0"), "work-pool": "bond-listed-pool"}
    for command, shown in expected.items():
        out = prefect_cli([command, "ls"], prefect_server, tmp_path)
        assert out.returncode == 0 and not re.search(r"\b422\b", out.stdout + out.stderr), \
            f"prefect {command} ls: {out.stderr[-800:]}"  # (a run id may hold the digits 422)
        assert shown in out.stdout, f"prefect {command} ls does not list {shown}:\n{out.stdout}"


def test_deployment_on_a_process_work_pool_runs_from_another_directory(prefect_server, store, tmp_path):
    """`bond serve --pool` started in one directory registers the rounds flow by module path; a
    `prefect worker --run-once` started in another runs it to completion on the tiny store."""
    from prefect.deployments import run_deployment

    made = prefect_cli(["work-pool", "create", "--type", "process", "bond-test-pool"], prefect_server, tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    (elsewhere := tmp_path / "elsewhere").mkdir()
    (worker_dir := tmp_path / "worker").mkdir()
    cfg = tmp_path / "rounds.yaml"
    cfg.write_text("generate: {k: 4, max_new_tokens: 6, shard_prompts: 5}\n"
                   f"score: {{rm: '{REWARD}'}}\n"
                   "train: {micro_batch_size: 8, epochs: 1, checkpoint_every: 4, lr: 0.001}\n")
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    serve = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--store", str(store.root), "--num", "1",
                            "--n", "2", "--config", str(cfg), "--name", "pooled", "--pool", "bond-test-pool"],
                           env=env, cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert serve.returncode == 0, serve.stderr
    assert "work pool 'bond-test-pool'" in serve.stdout

    run = run_deployment("bond-rounds/pooled", timeout=0)
    worker = prefect_cli(["worker", "start", "--pool", "bond-test-pool", "--run-once"], prefect_server, worker_dir,
                         timeout=400)
    assert worker.returncode == 0, worker.stderr[-2000:]

    async def final_state():
        async with get_client() as client:
            return await client.read_flow_run(run.id)
    finished = asyncio.run(final_state())
    assert finished.state_type.value == "COMPLETED", worker.stderr[-2000:]
    assert finished.name == "rounds-0-to-0" and f"store:{store.root}" in finished.tags
    assert store.anchor(1) is not None  # the round ran: its trained anchor is registered
    assert not list(elsewhere.iterdir())  # nothing written where serve was started


def test_serve_to_a_missing_work_pool_is_one_error_line(prefect_server, store, capsys):
    from flows.cli import main

    assert main(["serve", "--store", str(store.root), "--num", "1", "--pool", "no-such-pool"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "work pool 'no-such-pool' does not exist" in err[0]


def test_serve_to_a_pool_without_a_server_is_one_error_line(store, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--store", str(store.root), "--num", "1",
                          "--pool", "p"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "set PREFECT_API_URL" in out.stderr


def test_artifact_keys_of_two_stores_with_one_folder_name_differ(tmp_path):
    a, b = tmp_path / "x" / "store", tmp_path / "y" / "store"
    assert artifact_key(a, "round", 0) != artifact_key(b, "round", 0)
    assert artifact_key(a, "round", 0) == artifact_key(str(a) + "/", "round", 0)
    assert re.fullmatch(r"store-[0-9a-f]{6}-round-0", artifact_key(a, "round", 0))
