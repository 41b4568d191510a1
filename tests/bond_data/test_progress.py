"""Progress off a terminal: plain lines at most every interval, with counts, share and an ETA from
the rate so far; a timer line while an update is slow; a stage's lines and its summary line, whose
numbers are what the store holds."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from testutil import REWARD

from bond_data import stages
from bond_data.backends.base import Sampling
from bond_data.progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_at_most_every_interval_with_counts_and_eta():
    out, clock = io.StringIO(), Clock()
    with Progress("generate round 3", 40, "candidates", stream=out, tty=False, interval=10, clock=clock) as p:
        for step in range(8):  # 5 done every 4 s: a line only once 10 s have passed since the last
            clock.now += 4
            p.advance(5, note=f"{step + 1}/8 shards")
    lines = out.getvalue().splitlines()
    # lines at t = 12, 24 (then 28..32 is under 10 s since 24): after 3 and 6 updates
    assert lines == [
        "generate round 3: 15/40 candidates (38%), 3/8 shards, 12 s elapsed, ETA 20 s",
        "generate round 3: 30/40 candidates (75%), 6/8 shards, 24 s elapsed, ETA 8 s",
    ]


def test_eta_is_the_remaining_work_at_the_rate_so_far():
    clock = Clock()
    p = Progress("train", 200, "steps", stream=io.StringIO(), tty=False, interval=1e9, clock=clock, start=50)
    clock.now += 30
    p.advance(20)  # 20 steps in 30 s since the resume at step 50: 130 left take 195 s
    assert p.line() == "train: 70/200 steps (35%), 30 s elapsed, ETA 3 min 15 s"
    p.close()


def test_a_timer_line_while_no_update_comes():
    out = io.StringIO()
    with Progress("build round 0", 1, "dataset", stream=out, tty=False, interval=0.2):
        time.sleep(0.8)
    lines = out.getvalue().splitlines()
    assert lines and all(re.fullmatch(r"build round 0: 0/1 dataset \(0%\), \d s elapsed, ETA \?", x) for x in lines)


def test_a_terminal_gets_a_bar_not_lines(monkeypatch):
    out = io.StringIO()
    with Progress("train", 3, "steps", stream=out, tty=True, interval=0) as p:
        assert p.bar is not None
        p.advance(1)
    assert "train: 1/3 steps" not in out.getvalue()


def test_stage_progress_lines_and_summaries_match_the_store(store, capsys, monkeypatch):
    monkeypatch.setenv("BOND_PROGRESS_SECONDS", "0")  # a line on every shard
    gen = stages.generate_round(store, 0, 4, Sampling(max_new_tokens=6), shard_prompts=4, batch_size=16)
    sco = stages.score_round(store, 0, REWARD)
    err = capsys.readouterr().err.splitlines()
    gen_lines = [x for x in err if x.startswith("generate round 0:")]
    assert [re.match(r"generate round 0: (\d+)/40 candidates \(\d+%\), (\d)/3 shards, \d+ s elapsed, ETA", x).group(2)
            for x in gen_lines] == ["1", "2", "3"]
    assert gen_lines[-1].startswith("generate round 0: 40/40 candidates (100%), 3/3 shards")
    assert [x.split(",")[0] for x in err if x.startswith("score round 0")][-1] == "score round 0 (letter_count): 40/40 rewards (100%)"

    cands = pa.concat_tables([pq.read_table(store.root / m["path"]) for m in store.registered_shards("candidates", 0)])
    tokens = int(np.sum(cands.column("num_tokens").to_numpy()))
    stop = cands.column("finish_reason").to_pylist().count("stop")
    assert (gen["candidates"], gen["tokens"]) == (40, tokens)
    assert gen["finish_reasons"] == {r: n for r, n in (("stop", stop), ("length", 40 - stop)) if n}
    line = stages.generate_summary(gen)
    assert f"40 candidates (k = 4), {tokens} tokens in" in line and "tokens/s" in line
    assert f"finish: {', '.join(f'{n} {r}' for r, n in sorted(gen['finish_reasons'].items()))}" in line

    rewards = np.array(store.query("SELECT reward FROM scores WHERE round = 0").column("reward").to_pylist())
    r = sco["rewards"]
    assert r["scored"] == 40 and np.isclose(r["mean"], rewards.mean()) and np.isclose(r["std"], rewards.std())
    assert (r["min"], r["max"]) == (rewards.min(), rewards.max())
    assert stages.score_summary(sco).endswith(f"40 rewards in the round: mean {rewards.mean():.4f}, "
                                              f"std {rewards.std():.4f}, min {rewards.min():.4f}, max {rewards.max():.4f}")
    again = stages.generate_round(store, 0, 4, Sampling(max_new_tokens=6), shard_prompts=4, batch_size=16)
    assert stages.generate_summary(again) == "round 0: generated 0 shard(s): nothing missing at k = 4"
