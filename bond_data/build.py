"""Distillation datasets: every candidate of a round with its exact Best-of-N weight.

The weights come from the catalog's `bon_pool(n)` SQL macro (window functions over the `pool`
view; `bond_data.bon` is the same math in numpy, and the tests hold the two equal); DuckDB streams
the rows to Parquet under a memory limit, so a round of millions of candidates builds in bounded
memory. Only a round fully scored by the reward model is built. A dataset is
Parquet under `datasets/round=R/<id>/` with a dataset card (README.md) and is loadable with
`datasets.load_dataset("parquet", data_files=...)`. Its id hashes (round, rm, n, the scores shards it
read), so rebuilding after raising k makes a new dataset and rebuilding unchanged data is a no-op.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from bond_data import bon, schema
from bond_data.files import atomic_path
from bond_data.store import Store, StoreError

CARD = """---
license: other
tags: [bond, best-of-n, distillation]
---
# BOND distillation dataset `{dataset_id}`

Every candidate of round {round} of the store, weighted towards the Best-of-{n} distribution of the
round's anchor under reward model `{rm_id}` (hash `{rm_hash}`).

- `bon_weight` = (p_le^n - p_lt^n) / (p_le - p_lt) (BOND Theorem 1, ties included); within a prompt
  `bon_weight / k` sums to 1, so `sum_i bon_weight_i * loss_i / k` is the Best-of-{n} expectation.
- `p_lt`, `p_le`: fraction of the prompt's pool with a smaller / smaller-or-equal reward.
- `anchor_logprob`: log-probability of the completion under the anchor (temperature 1).

| | |
|---|---|
| prompts | {prompts} |
| candidates | {candidates} |
| samples per prompt (k) | {k_min} to {k_max} |
| tie rate | {tie_rate:.3f} |
| effective sample size per prompt (mean) | {ess_mean:.2f} |

Load it with `datasets.load_dataset("parquet", data_files="{data_file}")`.
"""


def dataset_summary(table: pa.Table) -> dict:
    """Prompts, candidates, tie rate and the effective sample size of the weights, in numpy: the
    reference the store's streamed SQL summary (what `bond build` reports) is tested against."""
    group = np.asarray(table.column("prompt_id").to_pylist())
    reward = table.column("reward").to_numpy()
    weight = table.column("bon_weight").to_numpy()
    _, gid, counts = np.unique(group, return_inverse=True, return_counts=True)
    ess = bon.effective_sample_size(group, weight)
    # E_BoN[r] of a prompt = sum_i (w_i / k) r_i: the reward the distilled policy aims at.
    bon_reward = np.bincount(gid, weights=weight * reward) / counts
    return {
        "prompts": int(len(counts)), "candidates": table.num_rows,
        "k_min": int(counts.min()), "k_max": int(counts.max()),
        "tie_rate": bon.tie_rate(group, reward),
        "ess_mean": float(ess.mean()), "ess_fraction": float((ess / counts).mean()),
        "mean_reward": float((np.bincount(gid, weights=reward) / counts).mean()),
        "bon_reward": float(bon_reward.mean()),
    }


def resolve_rm(store: Store, round_: int, rm_id: str | None) -> str:
    ids = store.reward_model_ids(round_)
    if not ids:
        raise StoreError(f"round {round_} has no scores yet: run `bond score` first")
    if rm_id is None:
        if len(ids) > 1:
            raise StoreError(f"round {round_} has scores from several reward models {ids}: pass --rm-id")
        return ids[0]
    if rm_id not in ids:
        raise StoreError(f"round {round_} has no scores from reward model {rm_id!r} (it has {ids})")
    return rm_id


def check_complete(store: Store, round_: int, rm_id: str) -> None:
    """Refuse a round whose pool is not fully scored by this reward model: a dataset of part of
    the round would silently weight each prompt against the wrong pool, or drop prompts."""
    missing = store.missing_scores(round_, rm_id)
    if missing["shards"]:
        raise StoreError(
            f"round {round_}: {missing['shards']} of {missing['of_shards']} candidates shards "
            f"({missing['candidates']} candidates) have no scores from reward model {rm_id!r} yet; "
            f"run `bond score --round {round_}` with that reward model (or wait for the running one) first")


def build_dataset(store: Store, round_: int, n: int, rm_id: str | None = None) -> dict:
    """Write (or find) the round's distillation dataset; return its catalog record with a summary."""
    with store.writing(f"bond build --round {round_} --n {n}"):
        rm_id = resolve_rm(store, round_, rm_id)
        check_complete(store, round_, rm_id)
        shards = sorted(m["shard_id"] for m in store.registered_shards("scores", round_, rm_id))
        dataset_id = f"n{n}-{rm_id}-" + schema.sha256_hex(f"{round_}\0{rm_id}\0{n}\0" + ",".join(shards), 12)
        existing = store.query("SELECT * FROM datasets WHERE dataset_id = ?", [dataset_id]).to_pylist()
        if existing:
            record = existing[0]
            return {**record, "card": json.loads(record["card"]), "reused": True}
        folder = store.root / "datasets" / f"round={round_}" / dataset_id
        record = _write(store, folder, dataset_id, round_, rm_id, n)
        store.register_dataset(record)
    return {**record, "reused": False}


def _write(store: Store, folder: Path, dataset_id: str, round_: int, rm_id: str, n: int) -> dict:
    """Parquet (streamed by DuckDB, bounded memory) + card into a temporary folder, renamed into
    place: a dataset is there whole or not at all."""
    rm_hash = store.query("SELECT rm_hash FROM reward_models WHERE rm_id = ?", [rm_id]).column(0)[0].as_py()
    data_file = folder / "part-0.parquet"
    with atomic_path(folder) as tmp:  # an unregistered leftover of a killed build is replaced
        tmp.mkdir()
        store.write_dataset(round_, rm_id, n, tmp / "part-0.parquet")
        shutil.rmtree(tmp / ".duckdb-tmp", ignore_errors=True)
        summary = store.dataset_summary(tmp / "part-0.parquet")
        if summary["candidates"] == 0:
            raise StoreError(f"round {round_} has no scored candidates for reward model {rm_id!r}")
        card = CARD.format(dataset_id=dataset_id, round=round_, n=n, rm_id=rm_id, rm_hash=rm_hash[:16],
                           data_file=data_file, **summary)
        (tmp / "README.md").write_text(card)
    return {
        "dataset_id": dataset_id, "round": round_, "rm_id": rm_id, "n": n,
        "path": data_file.relative_to(store.root).as_posix(), "num_rows": summary["candidates"],
        "num_prompts": summary["prompts"], "card": summary,
    }
