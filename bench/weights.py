"""Best-of-N weights of a whole round: the store's DuckDB SQL against a pandas groupby-rank.

Ours is the SQL the store runs: `bond_data.store.POOL_VIEW` (window functions giving p_lt, p_le
per (round, prompt, reward model) pool) and its `bon_pool(n)` macro, executed verbatim in an
in-memory DuckDB over a `scores` view of one Parquet file. The baseline is the obvious dataframe
implementation: pandas `groupby(prompt_id)` with `rank(method="min")` (p_lt) and
`rank(method="max")` (p_le), then the same weight formula; it groups by prompt alone (one round,
one reward model here), which only favours it. Both start from the same Parquet file on disk (the
store's scores shard schema, zstd, rows grouped by prompt as the store writes them; `--shuffle`
to scramble them) and end with a columnar table of candidate_id, p_lt, p_le and
bon_weight in memory. `bond_data.bon.bon_weights` (pure numpy) is timed as a third, informational
row. Rewards are rounded normals, so ties are frequent. All three must agree (allclose).

    .venv/bin/python bench/weights.py [--prompts 20000 --k 100 --n 16] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bond_data import bon, files, schema, store


def write_scores(path: Path, prompts: int, k: int, shuffle: bool = False, seed: int = 0) -> None:
    """A scores shard: 16-hex ids like the store's, integer-ish rewards; rows grouped by prompt
    (the order the store writes them in) unless `shuffle`."""
    rng = np.random.default_rng(seed)
    prompt_ids = np.array([f"{x:016x}" for x in rng.integers(0, 2**63, prompts)])
    rows = prompts * k
    order = rng.permutation(rows) if shuffle else np.arange(rows)
    table = pa.table({
        "candidate_id": [f"{x:016x}" for x in rng.integers(0, 2**63, rows)],
        "prompt_id": prompt_ids[np.repeat(np.arange(prompts), k)[order]],
        "round": pa.array(np.zeros(rows, np.int32)),
        "rm_id": ["rm"] * rows,
        "rm_hash": ["0" * 64] * rows,
        "reward": np.round(rng.normal(0.0, 2.0, rows)),  # ~13 distinct levels in a pool of 100
    }, schema=schema.SCORES)
    files.write_parquet_atomic(table, path)


def run_duckdb(path: Path, n: int, threads: int) -> pa.Table:
    con = duckdb.connect()
    try:
        con.execute(f"SET threads = {threads}")
        con.execute(f"CREATE VIEW scores AS SELECT * FROM read_parquet('{path}')")
        con.execute(store.POOL_VIEW)
        return con.sql("SELECT candidate_id, p_lt, p_le, bon_weight FROM bon_pool($n)",
                       params={"n": n}).to_arrow_table()
    finally:
        con.close()


def run_pandas(path: Path, n: int) -> pd.DataFrame:
    df = pd.read_parquet(path, columns=["candidate_id", "prompt_id", "reward"])
    g = df.groupby("prompt_id", sort=False)["reward"]
    size = g.transform("size")
    p_lt = (g.rank(method="min") - 1) / size
    p_le = g.rank(method="max") / size
    weight = (p_le**n - p_lt**n) / (p_le - p_lt)
    return pd.DataFrame({"candidate_id": df["candidate_id"], "p_lt": p_lt, "p_le": p_le, "bon_weight": weight})


def run_numpy(path: Path, n: int) -> pd.DataFrame:
    t = pq.read_table(path, columns=["candidate_id", "prompt_id", "reward"])
    group = t.column("prompt_id").to_numpy(zero_copy_only=False).astype(str)  # fixed-width: fast sort
    p_lt, p_le = bon.empirical_quantiles(group, t.column("reward").to_numpy())
    return pd.DataFrame({"candidate_id": t.column("candidate_id").to_pandas(), "p_lt": p_lt, "p_le": p_le,
                         "bon_weight": bon.bon_weight(p_lt, p_le, n)})


def by_candidate(frame) -> pd.DataFrame:
    df = frame.to_pandas() if isinstance(frame, pa.Table) else frame
    return df.sort_values("candidate_id", ignore_index=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=20_000)
    ap.add_argument("--k", type=int, default=100, help="samples per prompt")
    ap.add_argument("--n", type=int, default=16, help="the N of Best-of-N")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="DuckDB threads (pandas and numpy use one)")
    ap.add_argument("--shuffle", action="store_true", help="rows in random order (default: grouped by prompt)")
    ap.add_argument("--quick", action="store_true", help="2k prompts (~20 s)")
    args = ap.parse_args()
    if args.quick:
        args.prompts = 2_000

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scores.parquet"
        write_scores(path, args.prompts, args.k, args.shuffle)
        runs = {"pandas (baseline)": lambda: run_pandas(path, args.n),
                "duckdb (ours)": lambda: run_duckdb(path, args.n, args.threads),
                "numpy bon.py": lambda: run_numpy(path, args.n)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        results = {name: fn() for name, fn in runs.items()}  # warm-up, and the results we check
        for _ in range(args.repeats):  # interleaved, so background load hits every side alike
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    ref = by_candidate(results["pandas (baseline)"])
    assert len(ref) == args.prompts * args.k
    assert abs(ref["bon_weight"].mean() - 1.0) < 1e-9  # sum_i w_i / k = 1 in every pool
    for name, result in results.items():
        other = by_candidate(result)
        assert (other["candidate_id"].to_numpy() == ref["candidate_id"].to_numpy()).all(), name
        for col in ("p_lt", "p_le", "bon_weight"):
            assert np.allclose(other[col].to_numpy(), ref[col].to_numpy(), rtol=1e-12, atol=1e-12), (name, col)

    print(f"{args.prompts} prompts x k={args.k} = {args.prompts * args.k:,} candidates, n={args.n}, "
          f"{'shuffled' if args.shuffle else 'grouped'} rows, best of {args.repeats}; all three agree")
    print(f"{'':18} {'best s':>7} {'median s':>9} {'M rows/s':>9}")
    for name, ts in times.items():
        print(f"{name:18} {min(ts):7.2f} {statistics.median(ts):9.2f} {len(ref) / min(ts) / 1e6:9.1f}")
    base, ours = min(times["pandas (baseline)"]), min(times["duckdb (ours)"])
    print(f"speedup: {base / ours:.1f}x (baseline / ours)")


if __name__ == "__main__":
    main()
