"""Iterative BOND under a real Prefect server: rounds chain through registered anchors, a
`bond rounds` killed with SIGKILL resumes with nothing duplicated, and the cron deployment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from bond_data.config import BuildConfig, GenerateConfig, ScoreConfig
from trainer.config import TrainConfig
from flows.round import bond_rounds, rounds_deployment
from testutil import REWARD

pytestmark = pytest.mark.slow

TRAIN = TrainConfig(micro_batch_size=8, epochs=1, checkpoint_every=2, lr=1e-3).model_dump()
GEN = GenerateConfig(k=4, max_new_tokens=6, shard_prompts=2).model_dump()


def test_rounds_chain_through_registered_anchors(prefect_server, store):
    params = dict(generate=GEN, score=ScoreConfig(rm=REWARD).model_dump(), build=BuildConfig(n=2).model_dump(), train=TRAIN)
    done = bond_rounds(str(store.root), 2, **params)
    assert [d["round"] for d in done] == [0, 1]
    rounds = store.query("SELECT round, parent_round, anchor_hash FROM rounds ORDER BY round").to_pylist()
    assert [(r["round"], r["parent_round"]) for r in rounds] == [(0, None), (1, 0), (2, 1)]
    # round 1 generated from anchor 1: its candidates carry that anchor's hash
    hashes = store.query("SELECT round, any_value(anchor_hash) h, count(DISTINCT anchor_hash) d FROM candidates GROUP BY 1 ORDER BY 1")
    assert [(r["round"], r["h"], r["d"]) for r in hashes.to_pylist()] == [(t, rounds[t]["anchor_hash"], 1) for t in (0, 1)]
    assert bond_rounds(str(store.root), 2, **params) == []  # all done: nothing re-run


def test_rounds_killed_mid_run_then_rerun_duplicate_nothing(prefect_server, store, tmp_path):
    cfg = tmp_path / "rounds.yaml"
    cfg.write_text(
        "generate: {k: 4, max_new_tokens: 6, shard_prompts: 1, max_workers: 1}\n"
        f"score: {{rm: '{REWARD}'}}\n"
        "train: {micro_batch_size: 8, epochs: 2, checkpoint_every: 1, lr: 0.001}\n"
    )
    cmd = [sys.executable, "-m", "flows.cli", "rounds", "--store", str(store.root), "--num", "2", "--n", "2",
           "--config", str(cfg)]
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    target = store.root / "candidates" / "round=1"  # kill inside round 1's generation
    while time.time() < deadline and len(list(target.glob("*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(target.glob("*.parquet"))) < 10, "the kill must land mid-run"

    subprocess.run(cmd, env=env, check=True, timeout=400, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert store.query("SELECT list(round ORDER BY round) r FROM rounds").to_pylist() == [{"r": [0, 1, 2]}]
    counts = store.query("SELECT round, count(*) c, count(DISTINCT candidate_id) d FROM candidates GROUP BY 1 ORDER BY 1")
    assert counts.to_pylist() == [{"round": 0, "c": 40, "d": 40}, {"round": 1, "c": 40, "d": 40}]
    assert store.query("SELECT count(*) c, count(DISTINCT candidate_id || rm_id) d FROM scores").to_pylist() == [{"c": 80, "d": 80}]
    registered = {m["path"] for kind in ("candidates", "scores") for m in store.registered_shards(kind)}
    on_disk = {p.relative_to(store.root).as_posix() for sub in ("candidates", "scores")
               for p in (store.root / sub).rglob("*") if p.is_file()}
    assert on_disk == registered
    assert store.query("SELECT count(*) c FROM datasets").to_pylist() == [{"c": 2}]


def test_serve_builds_a_cron_deployment(store, tmp_path, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(tmp_path)  # the entrypoint does not depend on where `bond serve` started
    d = rounds_deployment(str(store.root), "0 3 * * *", 3, generate=GEN, score=ScoreConfig(rm=REWARD).model_dump(),
                          build=BuildConfig(n=2).model_dump(), train=TRAIN, name="nightly")
    assert d.name == "nightly" and d.parameters["num"] == 3 and d.parameters["store"] == str(store.root)
    assert [s.schedule.cron for s in d.schedules] == ["0 3 * * *"]
    assert d.entrypoint == "flows.round.bond_rounds" and f"store:{store.root}" in d.tags
    assert load_flow_from_entrypoint(d.entrypoint).name == "bond-rounds"


def test_a_round_inherits_the_previous_rounds_sampling_unless_set(store):
    """Round 0 drawn with max_new_tokens 6: round 1 keeps 6 when the user set nothing, and a
    setting the user gave wins and is reported as a change; a round already begun keeps its own."""
    from flows.round import inherit_sampling
    from testutil import run_generation

    run_generation(store, k=2, max_new_tokens=6)
    defaults = GenerateConfig().model_dump()
    inherited, changes = inherit_sampling(store, 1, defaults, explicit=[])
    assert (inherited["max_new_tokens"], inherited["temperature"], changes) == (6, 1.0, [])
    given, changes = inherit_sampling(store, 1, {**defaults, "max_new_tokens": 12}, explicit=["max_new_tokens"])
    assert given["max_new_tokens"] == 12 and changes == ["max_new_tokens 6 -> 12"]
    assert inherit_sampling(store, 1, defaults, explicit=None) == (defaults, ["max_new_tokens 6 -> 32"])
    # round 0 itself has begun: its own settings, not the defaults, fill what is unset
    assert inherit_sampling(store, 0, defaults, explicit=["k"])[0]["max_new_tokens"] == 6


def test_rounds_generate_with_the_trainers_attention_unless_told_otherwise(tmp_path):
    import argparse

    from flows.cli import rounds_params

    cfg = tmp_path / "rounds.yaml"
    args = argparse.Namespace(config=str(cfg), k=None, max_new_tokens=None, temperature=None, top_p=None, rm=None, n=2)
    cfg.write_text("train:\n  attn_implementation: varlen\n")
    assert rounds_params(args)["generate"]["attn_implementation"] == "varlen"
    cfg.write_text("train:\n  attn_implementation: varlen\ngenerate:\n  attn_implementation: sdpa\n")
    assert rounds_params(args)["generate"]["attn_implementation"] == "sdpa"


def test_rounds_flags_and_config_name_the_generate_keys_set(tmp_path):
    import argparse

    from flows.cli import rounds_params

    cfg = tmp_path / "rounds.yaml"
    cfg.write_text("generate:\n  temperature: 1.0\n")
    args = argparse.Namespace(config=str(cfg), k=None, max_new_tokens=16, temperature=None, top_p=None, rm=None, n=2)
    params = rounds_params(args)
    assert params["generate_set"] == ["max_new_tokens", "temperature"] and params["generate"]["max_new_tokens"] == 16


def test_the_round_summary_says_the_speed_and_the_mfu_when_known():
    from flows.round import train_line

    result = {"round": 2, "steps": 40, "next_anchor": {"anchor_hash": "ab" * 32}, "padding": 0.03,
              "tokens_per_s": 52438.2, "mfu": 0.157}
    assert ", padding 3.0% of the positions fed, 52,438 tokens/s (MFU 15.7%); anchor 3 = abababababab" in train_line(result)
    assert "tokens/s;" in train_line({**result, "mfu": None}) and "MFU" not in train_line({**result, "mfu": None})
    assert "tokens/s" not in train_line({**result, "tokens_per_s": None})  # resumed at the end: no step ran
