"""The store at data-team scale: registration cost against store size, reads, and a 1M-row build.

Writes synthetic shards (candidates of 8 rounds, ~270 rows each, k = 8 samples per prompt; prompts;
the scores of round 0) in the store's real layout, then, through the real code path:

1. registers every shard one at a time with `Store.register_shards` under the writer lease, as a
   flow's driver does, and prints the mean ms per registration around 1k / 10k / 30k shards and
   the ratio last / first. Baseline in the same process: the catalog this project had before (one
   DuckDB file whose views list every registered file, rewritten at each registration), timed at
   1k and 3k registered shards (at 30k it costs about a second per shard);
2. times `SELECT count(*) FROM candidates` on a fresh reader (what `bond sql` does), and the
   `pool` quantiles of round 0 (~1M candidates);
3. runs `bond_data.build.build_dataset` on round 0 in a child process and prints its peak RSS.

    python bench/store_scale.py            # 30,000 shards (~8M candidates), about 10 min on 2 cores
    python bench/store_scale.py --quick    # 3,000 shards, one round of ~100k candidates, about 1 min

Targets on the 2-core dev box: <= 20 ms per registration at 30k shards and last / first <= 1.5;
count(*) under 1 s; pool of 1M under 10 s; build of 1M under 2 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bond_data import schema
from bond_data.store import Store, shard_manifest

K = 8  # samples per prompt
ROWS = 272  # candidates per shard: 34 prompts x 8


def _prompts_table(shard: int) -> pa.Table:
    ids = [f"{shard:08d}{j:08x}" for j in range(ROWS // K)]
    return pa.table({"prompt_id": ids, "prompt": [f"sort: prompt {i} =" for i in ids], "messages": [None] * len(ids),
                     "source": ["synthetic"] * len(ids)}, schema=schema.PROMPTS)


def _candidates_table(shard: int, round_: int, per_round: int) -> pa.Table:
    prompt = np.repeat(np.arange(ROWS // K), K)
    index = np.tile(np.arange(K), ROWS // K)
    ids = [f"{round_:02d}{shard:08d}{j:06x}" for j in range(ROWS)]
    rng = np.random.default_rng(shard)
    return pa.table({
        "candidate_id": ids, "prompt_id": [f"{shard % per_round:08d}{p:08x}" for p in prompt],  # round 0's prompts
        "round": pa.array(np.full(ROWS, round_), pa.int32()), "sample_index": pa.array(index, pa.int32()),
        "completion": [f" completion {j}" for j in range(ROWS)],
        "token_ids": pa.array([[3, 4, 5, 6, 7, 8, 9, 2]] * ROWS, pa.list_(pa.int32())),
        "num_tokens": pa.array(np.full(ROWS, 8), pa.int32()), "finish_reason": ["stop"] * ROWS,
        "anchor_logprob": rng.normal(-20, 3, ROWS), "sample_logprob": rng.normal(-20, 3, ROWS),
        "anchor_hash": ["synthetic"] * ROWS, "backend": ["synthetic"] * ROWS, "sampling": ["{}"] * ROWS,
        "seed": pa.array(np.arange(ROWS), pa.int64())}, schema=schema.CANDIDATES)


def _write_shard(job: tuple[str, int, int]) -> list[dict]:
    """Write one candidates shard (and, for round 0, its prompts and scores): the worker's side."""
    root, shard, per_round = Path(job[0]), job[1], job[2]
    round_ = shard // per_round
    out = []
    cand = _candidates_table(shard, round_, per_round)
    path = root / "candidates" / f"round={round_}" / f"shard=s{shard:06d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(cand, path, compression="zstd")
    out.append(shard_manifest(root, path, "candidates", f"s{shard:06d}", round=round_))
    if round_ == 0:
        p = root / "prompts" / f"part-{shard:06d}.parquet"
        p.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_prompts_table(shard), p, compression="zstd")
        out.append(shard_manifest(root, p, "prompts", f"prompts-{shard:06d}"))
        rewards = np.round(np.random.default_rng(10_000 + shard).normal(size=ROWS), 2)  # ties, as real RMs give
        scores = pa.table({"candidate_id": cand.column("candidate_id"), "prompt_id": cand.column("prompt_id"),
                           "round": cand.column("round"), "rm_id": ["synthetic"] * ROWS,
                           "rm_hash": ["0" * 64] * ROWS, "reward": rewards}, schema=schema.SCORES)
        s = root / "scores" / "round=0" / "rm=synthetic" / f"shard=s{shard:06d}.parquet"
        s.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(scores, s, compression="zstd")
        out.append(shard_manifest(root, s, "scores", f"s{shard:06d}-synthetic", round=0, rm_id="synthetic"))
    return out


def write_shards(root: Path, shards: int, per_round: int) -> list[list[dict]]:
    jobs = [(str(root), i, per_round) for i in range(shards)]
    with Pool(2) as pool:
        return pool.map(_write_shard, jobs, chunksize=64)


def register_all(store: Store, manifests: list[list[dict]], marks: list[int]) -> dict[int, tuple[float, float]]:
    """Register every shard one call at a time (a flow's driver); (mean, median) ms over the 512
    calls before each mark (the mean counts the catalog's compactions, one per 256 calls)."""
    times = []
    with store.writing("bench/store_scale.py"):
        for group in manifests:
            for m in group:
                start = time.perf_counter()
                store.register_shards([m])
                times.append(time.perf_counter() - start)
    candidates = [i for i, m in enumerate(m for g in manifests for m in g) if m["kind"] == "candidates"]
    at = {}
    for mark in marks:
        pos = candidates[mark - 1]
        window = times[max(0, pos - 511) : pos + 1]
        at[mark] = (1000 * statistics.fmean(window), 1000 * statistics.median(window))
    return at


def legacy_registration_ms(root: Path, manifests: list[dict], sizes: list[int], tmp: Path) -> dict[int, float]:
    """The previous catalog: a DuckDB file, each registration an INSERT plus every view rewritten
    over the full list of registered files, in one transaction."""
    con = duckdb.connect(str(tmp / "legacy.duckdb"))
    con.execute("SET file_search_path = ?", [str(root)])
    con.execute("CREATE TABLE shards (shard_id VARCHAR PRIMARY KEY, kind VARCHAR, path VARCHAR)")
    out, done = {}, 0
    for size in sizes:
        con.executemany("INSERT INTO shards VALUES (?, ?, ?)",
                        [(m["shard_id"], m["kind"], m["path"]) for m in manifests[done:size - 20]])
        done, start = size - 20, time.perf_counter()
        for m in manifests[done:size]:
            con.execute("BEGIN TRANSACTION")
            con.execute("INSERT INTO shards VALUES (?, ?, ?)", [m["shard_id"], m["kind"], m["path"]])
            paths = [r[0] for r in con.execute("SELECT path FROM shards ORDER BY path").fetchall()]
            listing = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
            con.execute(f"CREATE OR REPLACE VIEW candidates AS SELECT * FROM read_parquet([{listing}])")
            con.execute("COMMIT")
        out[size] = 1000 * (time.perf_counter() - start) / 20
        done = size
    con.close()
    return out


BUILD = """
import json, resource, sys, time
from bond_data.build import build_dataset
from bond_data.store import Store
start = time.perf_counter()
record = build_dataset(Store(sys.argv[1]), 0, 8, "synthetic")
print(json.dumps({"seconds": time.perf_counter() - start, "rows": record["num_rows"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3,000 shards, one round of ~100k candidates")
    ap.add_argument("--shards", type=int, help="candidates shards in all (default 30,000; --quick 3,000)")
    ap.add_argument("--out", help="store folder (default: a temporary folder, deleted at the end)")
    args = ap.parse_args()
    shards = args.shards or (3_000 if args.quick else 30_000)
    per_round = min(3_750, shards)  # ~1M candidates per round (~100k with --quick)
    if args.quick:
        per_round = 375
    tmp = Path(tempfile.mkdtemp(prefix="bond-store-scale-"))
    root = Path(args.out) if args.out else tmp / "store"
    try:
        store = Store(root)
        with store.writing("bench/store_scale.py"):
            store.register_reward_model("synthetic", "0" * 64, "synthetic")
        start = time.perf_counter()
        manifests = write_shards(root, shards, per_round)
        rows = sum(m["num_rows"] for g in manifests for m in g if m["kind"] == "candidates")
        print(f"wrote {shards:,} candidates shards ({rows:,} candidates, {shards // per_round} rounds of "
              f"{per_round * ROWS:,}) plus round 0's prompts and scores in {time.perf_counter() - start:.0f} s")

        marks = [m for m in (1_000, 10_000, 30_000) if m <= shards] or [shards]
        marks = sorted(set(marks + [shards]))
        ours = register_all(store, manifests, marks)
        flat = [m for g in manifests for m in g if m["kind"] == "candidates"]
        legacy = legacy_registration_ms(root, flat, [s for s in (1_000, 3_000) if s <= shards], tmp)
        print("\nregistration, ms per shard (the 512 registrations before the mark: mean, with compactions; median)")
        for mark, (ms, median) in ours.items():
            base = f"   previous catalog {legacy[mark]:.0f} ms ({legacy[mark] / ms:.0f}x slower)" if mark in legacy else ""
            print(f"  at {mark:>6,} shards: {ms:6.2f} ms (median {median:.2f}){base}")
        first, last = ours[marks[0]][0], ours[marks[-1]][0]
        print(f"  last / first: {last / first:.2f} (target <= 1.5; at {marks[-1]:,}: target <= 20 ms)")
        if 3_000 in legacy:
            print(f"  previous catalog at 3,000: {legacy[3_000]:.0f} ms; 3,000 / 1,000 = {legacy[3_000] / legacy[1_000]:.1f}")

        print("\nreads (a fresh reader each time, as `bond sql` opens one)")
        for label, sql in [("SELECT count(*) FROM candidates", "SELECT count(*) AS n FROM candidates"),
                           ("  the same from the catalog (sum of num_rows)",
                            "SELECT sum(num_rows) AS n FROM shards WHERE kind = 'candidates'"),
                           ("pool quantiles of round 0", "SELECT count(*) AS n, avg(p_le) AS m FROM pool WHERE round = 0")]:
            times = []
            for _ in range(2):
                start = time.perf_counter()
                n = store.query(sql).to_pylist()[0]["n"]
                times.append(time.perf_counter() - start)
            print(f"  {label:<48} {n:>10,} rows  first {times[0]:.2f} s, again {times[1]:.2f} s")

        print("\nbuild of round 0 (child process)")
        result = subprocess.run([sys.executable, "-c", BUILD, str(root)], capture_output=True, text=True, check=True)
        built = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"  {built['rows']:,} rows in {built['seconds']:.1f} s, peak RSS {built['peak_rss_mb']:,.0f} MB (target < 2,048 MB)")
        print(f"\nthis process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")
    finally:
        if not args.out:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
