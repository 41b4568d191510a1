"""Clean deaths and resumes: Ctrl-C and --timeout stop a query, a killed command leaves no Prefect
server behind, and every stage killed with SIGKILL then re-run completes with nothing lost or
duplicated (generate and rounds: tests/flows/test_flows.py and test_rounds.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flows.cli import main

from testutil import REWARD, run_generation, run_scoring

LONG_QUERY = "SELECT sum(a.range * b.range) FROM range(1000000000) a, range(1000) b"


def _bond(*argv: str, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *argv], env=env or dict(os.environ), text=True, **popen)


@pytest.mark.slow
def test_ctrl_c_stops_a_long_query_with_one_line_and_exit_130(store):
    proc = _bond("sql", "--store", str(store.root), LONG_QUERY, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(4)  # past start-up: the query runs
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)  # (within a second here; the bound is generous on purpose)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["error: query interrupted (Ctrl-C)"]


def test_timeout_stops_a_long_query(store, capsys):
    assert main(["sql", "--store", str(store.root), "--timeout", "0.5", LONG_QUERY]) == 124
    assert capsys.readouterr().err.strip() == "error: query stopped after --timeout 0.5 s"


def _descendants(pid: int) -> list[tuple[int, str]]:
    rows = [line.split(None, 2) for line in subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True,
                                                            text=True).stdout.splitlines()[1:]]
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid, args in rows:
            if int(ppid) == parent:
                found.append((int(child), args))
                frontier.append(int(child))
    return found


@pytest.mark.slow
def test_a_killed_command_leaves_no_prefect_server(store):
    run_generation(store, k=1)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # its own temporary server
    proc = _bond("score", "--store", str(store.root), "--rm", "rewards_for_tests:slow_letter_count",
                 "--batch-size", "1", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any("uvicorn" in a for _, a in _descendants(proc.pid)):
        time.sleep(0.2)
    children = _descendants(proc.pid)
    assert any("uvicorn" in a for _, a in children), "the temporary server must have started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid, _ in children):
        time.sleep(0.2)
    assert [a for pid, a in children if os.path.exists(f"/proc/{pid}")] == []


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, "the kill must land mid-run"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_score_killed_mid_run_then_rerun_scores_every_candidate_once(prefect_server, store):
    run_generation(store, k=2, shard_prompts=1)  # 10 shards
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    argv = ["score", "--store", str(store.root), "--rm", "rewards_for_tests:slow_letter_count", "--batch-size", "4",
            "--max-workers", "1"]
    folder = store.root / "scores" / "round=0"
    _kill_when(_bond(*argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
               lambda: len(list(folder.rglob("*.parquet"))) >= 2)
    rerun = _bond(*argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    counts = store.query("SELECT count(*) AS n, count(DISTINCT candidate_id) AS d FROM scores").to_pylist()
    assert counts == [{"n": 20, "d": 20}]
    registered = {m["path"] for m in store.registered_shards("scores", 0)}
    assert {p.relative_to(store.root).as_posix() for p in folder.rglob("*") if p.is_file()} == registered


@pytest.mark.slow
def test_build_killed_at_any_moment_then_rerun_registers_one_whole_dataset(store):
    run_generation(store, k=4)
    run_scoring(store, REWARD)
    argv = ["build", "--store", str(store.root), "--n", "2"]
    for delay in (0.5, 1.0, 1.5, 2.0):  # start-up, planning, writing, registering
        proc = _bond(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert main(argv) == 0
    datasets = store.query("SELECT dataset_id, path, num_rows FROM datasets").to_pylist()
    assert len(datasets) == 1 and datasets[0]["num_rows"] == 40
    on_disk = [p for p in (store.root / "datasets" / "round=0").iterdir()]
    assert [p.name for p in on_disk] == [datasets[0]["dataset_id"]]  # no half-written or stray folder


@pytest.mark.slow
def test_train_killed_after_a_checkpoint_then_rerun_resumes_without_duplicate_metrics(store, tmp_path):
    run_generation(store, k=4)
    run_scoring(store, REWARD)
    from bond_data import build

    record = build.build_dataset(store, 0, n=2)
    argv = ["train", "--store", str(store.root), "--micro-batch-size", "4", "--epochs", "3", "--checkpoint-every", "2"]
    run_dir = store.root / "train" / "round=0" / record["dataset_id"]
    _kill_when(_bond(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
               lambda: any((p / "manifest.json").is_file() for p in run_dir.glob("step-*")) and
               (run_dir / "metrics.jsonl").is_file() and
               len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3)
    rerun = _bond(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 30  # 40 rows / 4 x 3 epochs, each once
    assert store.anchor(1) is not None
