"""Distillation datasets: every candidate of a round with its Best-of-N weights.

The weights come from the catalog's `bon_pool(n)` SQL macro (window functions over the `pool`
view; `bond_data.bon` is the same math in numpy, and the tests hold the two equal); DuckDB streams
the rows to Parquet under a memory limit, so a round of millions of candidates builds in bounded
memory. Only a round fully scored by the reward model is built. A dataset is Parquet under
`datasets/round=R/<id>/` with a Hugging Face dataset card (README.md, `bond_data.card`) and loads with
`datasets.load_dataset(folder)`; `bond export` copies it out (`bond_data.export`). Its id names and
hashes (round, rm, n, weighting, target, the scores shards it read), so rebuilding after raising k
makes a new dataset, a pool and an unbiased dataset of one round are two datasets, and rebuilding
unchanged data is a no-op.

Two checks guard the math: unbiased weights need n <= k in every pool, and BOND's target is
Best-of-n of the anchor, so a pool drawn at temperature != 1 or top_p != 1 (from a sampler q, not
the anchor) is refused unless the user asks for Best-of-n of that sampler (`target="sampler"`),
in which case the sampler's log-probs stand in for log A.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bond_data import bon, card, schema
from bond_data.files import atomic_path
from bond_data.store import Store, StoreError

FORMULAS = {
    "unbiased": "k (C(le, n) - C(lt, n)) / (C(k, n) (le - lt)), with le / lt the counts of pool rewards <= / < "
                "the candidate's (itself included): the probability that it is the maximum of a uniformly random "
                "n-subset of the pool (ties split uniformly), times k. Unbiased for Best-of-n of the policy that "
                "drew the pool, ties included; 0 for candidates ranked below n.",
    "pool": "(p_le^n - p_lt^n) / (p_le - p_lt) (BOND Theorem 1 on the pool's empirical distribution, ties "
            "included): Best-of-n drawn with replacement from the pool, a weaker target than Best-of-n of the "
            "policy when n is not much smaller than k.",
}
TARGETS = {"anchor": ("anchor", "the anchor: `anchor_logprob`"),
           "sampler": ("sampler (the pool was drawn with temperature or top_p != 1)", "the sampler: `sample_logprob`")}


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


def check_n_fits(store: Store, round_: int, rm_id: str, n: int) -> None:
    """Unbiased weights average over n-subsets of each pool: refuse a round with a pool smaller than n."""
    sizes = store.pool_sizes(round_, rm_id)
    if sizes["k_min"] is not None and sizes["k_min"] < n:
        raise StoreError(
            f"round {round_}: unbiased Best-of-{n} weights need n <= k, but the smallest pool has k = {sizes['k_min']} "
            f"samples (N = {n}); raise k (`bond generate --round {round_} --k {n}` or more) or build with "
            f"`--weighting pool`")


def check_target(store: Store, round_: int, target: str) -> None:
    """BOND distils Best-of-n of the anchor: a pool sampled at temperature != 1 or top_p != 1 comes
    from another policy q, and its weights target Best-of-n of q. Refuse it unless asked for."""
    if target == "sampler":
        return
    found = store.sampling_settings(round_)
    tempered = [s for s in found if float(s.get("temperature", 1.0)) != 1.0 or float(s.get("top_p", 1.0)) != 1.0]
    if tempered:
        settings = "; ".join(f"temperature {s.get('temperature')}, top_p {s.get('top_p')}" for s in tempered)
        raise StoreError(
            f"round {round_}: candidates were sampled with {settings}, not from the anchor itself (temperature 1, "
            f"top_p 1), so their Best-of-N weights target Best-of-N of that sampler, not of the anchor. Regenerate "
            f"the round at temperature 1 and top_p 1, or build with `--target sampler` (the trainer then uses the "
            f"sampler's log-probs as log A)")


def check_buildable(store: Store, round_: int, n: int, rm_id: str | None, weighting: str, target: str) -> str:
    """The reward model the dataset would use, once the round is known buildable: fully scored by
    it, sampled as the target requires, and (unbiased weights) every pool holding at least n."""
    rm_id = resolve_rm(store, round_, rm_id)
    check_complete(store, round_, rm_id)
    check_target(store, round_, target)
    if weighting == "unbiased":
        check_n_fits(store, round_, rm_id, n)
    return rm_id


def dataset_id_of(round_: int, rm_id: str, n: int, weighting: str, target: str, shards: list[str]) -> str:
    """Readable (n, weighting, target, rm) and a hash of everything that determines the rows."""
    name = f"n{n}-{weighting}" + ("-sampler" if target == "sampler" else "") + f"-{rm_id}-"
    return name + schema.sha256_hex(f"{round_}\0{rm_id}\0{n}\0{weighting}\0{target}\0" + ",".join(shards), 12)


def build_dataset(store: Store, round_: int, n: int, rm_id: str | None = None, weighting: str = "unbiased",
                  target: str = "anchor", license: str = "other") -> dict:
    """Write (or find) the round's distillation dataset; return its catalog record with a summary.
    `license` goes on the card of a new dataset (an existing one keeps its own: `bond export
    --license` sets it on a copy)."""
    if weighting not in FORMULAS or target not in TARGETS:
        raise ValueError(f"weighting must be one of {list(FORMULAS)} and target one of {list(TARGETS)}, "
                         f"got {weighting!r} and {target!r}")
    with store.writing(f"bond build --round {round_} --n {n} --weighting {weighting} --target {target}"):
        rm_id = check_buildable(store, round_, n, rm_id, weighting, target)
        shards = sorted(m["shard_id"] for m in store.registered_shards("scores", round_, rm_id))
        dataset_id = dataset_id_of(round_, rm_id, n, weighting, target, shards)
        existing = store.query("SELECT * FROM datasets WHERE dataset_id = ?", [dataset_id]).to_pylist()
        if existing:
            return {**catalog_record(existing[0]), "reused": True}
        folder = store.root / "datasets" / f"round={round_}" / dataset_id
        record = _write(store, folder, dataset_id, round_, rm_id, n, weighting, target, license)
        store.register_dataset(record)
    return {**record, "reused": False}


def catalog_record(row: dict) -> dict:
    """A `datasets` catalog row with its card parsed. The weighting and target live in the card
    (no catalog column: manifests written before them still read); datasets built before either
    existed used pool weights of the anchor."""
    card = json.loads(row["card"])
    return {**row, "card": card, "weighting": card.get("weighting", "pool"), "target": card.get("target", "anchor")}


def _write(store: Store, folder: Path, dataset_id: str, round_: int, rm_id: str, n: int, weighting: str,
           target: str, license: str) -> dict:
    """Parquet (streamed by DuckDB, bounded memory) + card into a temporary folder, renamed into
    place: a dataset is there whole or not at all."""
    data_file = folder / "part-0.parquet"
    with atomic_path(folder) as tmp:  # an unregistered leftover of a killed build is replaced
        tmp.mkdir()
        store.write_dataset(round_, rm_id, n, tmp / "part-0.parquet", weighting, target)
        shutil.rmtree(tmp / ".duckdb-tmp", ignore_errors=True)
        summary = store.dataset_summary(tmp / "part-0.parquet")
        if summary["candidates"] == 0:
            raise StoreError(f"round {round_} has no scored candidates for reward model {rm_id!r}")
        meta = card_meta(store, dataset_id, round_, rm_id, n, weighting, target, summary)
        meta_file = pq.read_metadata(tmp / "part-0.parquet")
        card.write_card(tmp, "parquet", meta_file.schema.to_arrow_schema(), summary["candidates"],
                        (tmp / "part-0.parquet").stat().st_size, meta, license)
    return {
        "dataset_id": dataset_id, "round": round_, "rm_id": rm_id, "n": n,
        "path": data_file.relative_to(store.root).as_posix(), "num_rows": summary["candidates"],
        "num_prompts": summary["prompts"], "weighting": weighting, "target": target,
        "card": {**summary, "weighting": weighting, "target": target, "license": license,
                 "anchor_hash": meta["provenance"]["anchor_hash"]},
    }


def card_meta(store: Store, dataset_id: str, round_: int, rm_id: str, n: int, weighting: str, target: str,
              summary: dict) -> dict:
    """What the card says: the summary, the math, and the provenance of the rows."""
    rm = store.query("SELECT rm_hash, spec FROM reward_models WHERE rm_id = ?", [rm_id]).to_pylist()[0]
    anchor = store.anchor(round_) or {"anchor_path": None, "anchor_hash": None}
    target_name, target_column = TARGETS[target]
    lineage = store.round_lineage(round_)
    provenance = {
        "store": str(store.root), "round": round_, "dataset_id": dataset_id,
        "anchor_path": anchor["anchor_path"], "anchor_hash": anchor["anchor_hash"],
        "tokenizer": card.tokenizer_provenance(anchor["anchor_path"]) if anchor["anchor_path"] else {
            "name_or_path": None, "special_tokens": {}},
        "sampling": lineage["sampling"], "backends": lineage["backends"],
        "rm_id": rm_id, "rm_hash": rm["rm_hash"], "rm_spec": rm["spec"],
        "n": n, "k_min": summary["k_min"], "k_max": summary["k_max"], "weighting": weighting, "target": target,
    }
    return {"dataset_id": dataset_id, "round": round_, "n": n, "rm_id": rm_id, "weighting": weighting,
            "target": target, "formula": FORMULAS[weighting], "target_name": target_name,
            "target_column": target_column, "summary": summary, "provenance": provenance}
