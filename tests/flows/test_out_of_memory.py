"""A device out of memory is a setting to change, not a bug: one `error:` line that keeps torch's
own words (what it tried to allocate, what the device holds) and names the flags that shrink the
command, exit code 2, no retries of a shard that would fail the same way, and nothing registered
for what did not finish. torch's OutOfMemoryError is raised where a GPU would raise it (no GPU
here): in the reward model's batch, in the training step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import rewards_for_tests
import torch
from testutil import run_generation, tree_digest

from flows.cli import main
from trainer import train as train_mod
from trainer.config import MEMORY_HINT

TORCH_SAID = ("error: out of memory: CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
              "79.19 GiB of which 3.12 GiB is free; ")


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_reward_model_out_of_memory_is_one_line_and_is_not_retried(prefect_server, store, tmp_path):
    """The real command line, in its own process (where Prefect's log lines are off, as for a user)."""
    shards = run_generation(store, k=2)  # 10 prompts x 2 samples in shards of 4 prompts
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "BOND_TEST_CALLS": str(calls)}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "score", "--store", str(store.root), "--rm",
                           "rewards_for_tests:out_of_memory_past_the_check"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(TORCH_SAID), lines[0]
    assert "lower --batch-size" in lines[0] and "a re-run resumes" in lines[0] and "Of the allocated" not in lines[0]
    # past the checks' 2 rows, each shard's one batch (8, 8 and 4 candidates) once: no retry
    assert shards == 3 and sorted(int(n) for n in calls.read_text().split() if int(n) > 2) == [4, 8, 8]
    assert store.query("SELECT count(*) AS n FROM reward_models").to_pylist() == [{"n": 0}]
    assert store.registered_shards("scores", 0) == []


def _oom_at_second_step(monkeypatch):
    calls = []

    def step(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError(rewards_for_tests.OOM_MESSAGE)
        return real(*args, **kw)

    real = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", step)


@pytest.mark.parametrize("entry", ["bond train", "python -m trainer.train"])
def test_training_out_of_memory_is_one_line_naming_what_shrinks_the_step(entry, round0, monkeypatch, capsys):
    _oom_at_second_step(monkeypatch)
    before = tree_digest(round0.root / "_catalog")
    flags = ["--store", str(round0.root), "--micro-batch-size", "8", "--checkpoint-every", "100"]
    code = main(["train", *flags]) if entry == "bond train" else train_mod.main(flags)
    line = one_line(capsys)
    assert code == 2 and line.startswith(TORCH_SAID), line
    assert MEMORY_HINT in line
    assert round0.anchor(1) is None  # no next anchor registered
    after = tree_digest(round0.root / "_catalog")
    assert {k: v for k, v in after.items() if "writer.lock" not in k} == \
        {k: v for k, v in before.items() if "writer.lock" not in k}  # the catalog as it was
