"""Small helpers shared by tests (tests/ is on sys.path, see conftest.py)."""

import json

from bond_data import stages
from bond_data.backends.base import Sampling


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


REWARD = "rewards_for_tests:letter_count"


def run_generation(store, k, round_=0, shard_prompts=4, max_new_tokens=8) -> int:
    """Generate without Prefect (the stage the flows run); the number of shards written."""
    result = stages.generate_round(store, round_, k, Sampling(max_new_tokens=max_new_tokens), shard_prompts, batch_size=16)
    return result["shards_generated"]


def run_scoring(store, spec=REWARD, round_=0, rm_id=None) -> str:
    """Score without Prefect; the reward model's id."""
    return stages.score_round(store, round_, spec, rm_id)["rm_id"]


def tree_digest(root) -> dict[str, str]:
    """Every file under a folder with its sha256: equal digests mean a byte-for-byte unchanged store.
    The writer lease's lock file is left out: taking the lease records its holder there."""
    from pathlib import Path

    from bond_data.files import file_sha256

    root = Path(root)
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "writer.lock"}


def torchrun(nproc: int, store_root, flags: list[str], script: list[str] | None = None, port: int = 29541, check=True):
    """`python -m torch.distributed.run` of trainer.train (or `script`) on a store, one thread per
    process; the completed process (output captured as text)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    target = script or ["-m", "trainer.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           *target, "--store", str(store_root), *flags]
    return subprocess.run(cmd, env=env, check=check, timeout=600, capture_output=True, text=True)


def crashing(fn, at: int, error: BaseException):
    """`fn`, except that its `at`-th call raises `error` (a simulated crash mid-run)."""
    calls = {"n": 0}

    def wrapped(*args, **kw):
        calls["n"] += 1
        if calls["n"] == at:
            raise error
        return fn(*args, **kw)

    return wrapped
