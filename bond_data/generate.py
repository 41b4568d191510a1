"""Generation: sample k candidates per prompt from a round's anchor into candidates shards.

Work is planned from what is missing: for each prompt, the sample indices in [0, k) that no
registered shard holds. Raising k from 8 to 16 plans only indices 8..15; after a crash, the
planner sees the same gaps and rebuilds the same shards (same ids, same seeds).

The transformers backend batches rows across prompts *and* samples (one `generate` call per
micro-batch, not per prompt) and still gives every candidate its own seed, so a candidate does not
depend on which batch it landed in: `SeededGumbelSampler` adds Gumbel noise drawn from a counter-
based hash of (seed, step, token) and lets greedy decoding take the argmax, which is an exact
sample from the temperature / top-p distribution (the Gumbel-max trick). It also records, for each
generated token, its log-probability under the raw anchor (temperature 1: `anchor_logprob`, the
trainer's log A(y)) and under the sampler (`sample_logprob`), under the precision policy of
`bond_data.precision`, which the shard's `sampling` JSON records for the trainer to follow.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bond_data import schema
from bond_data.backends import load_backend
from bond_data.backends.base import Completion, PromptJob, Sampling
from bond_data.files import write_parquet_atomic
from bond_data.store import Store, shard_manifest


# ---- planning (driver side) -------------------------------------------------------------------
def plan_generation(store: Store, round_: int, k: int, shard_prompts: int) -> list[dict]:
    """Shards still to generate for a round: each a dict (JSON-able, so it travels to any worker).
    The gaps come from the catalog by an anti-join, streamed in prompt_id order (a stable order, so
    a re-run plans the same shards)."""
    jobs = [{"prompt_id": p["prompt_id"], "prompt": p["prompt"],
             "messages": json.loads(p["messages"]) if p["messages"] else None,
             "sample_indices": p["missing"],
             "seeds": [schema.candidate_seed(round_, p["prompt_id"], i) for i in p["missing"]]}
            for p in store.missing_samples(round_, k)]
    plans = []
    for start in range(0, len(jobs), shard_prompts):
        chunk = jobs[start : start + shard_prompts]
        key = ";".join(f"{j['prompt_id']}:{j['sample_indices'][0]}-{j['sample_indices'][-1]}" for j in chunk)
        shard_id = f"r{round_}-" + schema.sha256_hex(f"{round_}\0{key}")
        plans.append({"shard_id": shard_id, "round": round_, "jobs": chunk})
    return plans


# ---- one shard (worker side) ------------------------------------------------------------------
def generate_shard(store_root: str, plan: dict, anchor: dict, backend: str, sampling: Sampling,
                   batch_size: int = 64, device: str | None = None, engine_args: dict | None = None) -> dict:
    """Generate one planned shard, write it atomically and return its manifest (no catalog write)."""
    root = Path(store_root)
    out = root / "candidates" / f"round={plan['round']}" / f"shard={plan['shard_id']}.parquet"
    jobs = [PromptJob(**j) for j in plan["jobs"]]
    model = load_backend(backend, anchor["anchor_path"], anchor["anchor_hash"], batch_size, device, engine_args)
    completions = model.generate(jobs, sampling)
    # the lineage records the resolved policy and the log A pass's attention (vLLM: none)
    sampling = replace(sampling, precision=model.precision(sampling), attention=getattr(model, "attention", None))
    table = candidate_table(plan["round"], jobs, completions, anchor["anchor_hash"], model.name, sampling)
    write_parquet_atomic(table, out)
    return shard_manifest(root, out, "candidates", plan["shard_id"], round=plan["round"])


def generation_stats(store_root: Path, manifests: list[dict], seconds: float) -> dict:
    """Candidates, tokens, tokens/s and finish reasons (`stop`: end of sequence, `length`: cut at
    max_new_tokens) of the shards one run wrote, read back from the shards themselves."""
    if not manifests:
        return {"candidates": 0, "tokens": 0, "seconds": seconds, "tokens_per_s": 0.0, "finish_reasons": {}}
    table = pa.concat_tables([pq.read_table(Path(store_root) / m["path"], columns=["num_tokens", "finish_reason"])
                              for m in manifests])
    tokens = int(pc.sum(table.column("num_tokens")).as_py() or 0)
    reasons = {r["values"]: int(r["counts"]) for r in pc.value_counts(table.column("finish_reason")).to_pylist()}
    return {"candidates": table.num_rows, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "finish_reasons": reasons}


def candidate_table(round_: int, jobs: list[PromptJob], completions: list[list[Completion]],
                    anchor_hash: str, backend: str, sampling: Sampling) -> pa.Table:
    """Rows of the candidates schema, with their lineage, from a backend's output."""
    rows = []
    params = json.dumps(asdict(sampling), sort_keys=True)
    for job, outs in zip(jobs, completions, strict=True):
        if len(outs) != len(job.sample_indices):
            raise RuntimeError(f"backend {backend} returned {len(outs)} completions for {len(job.sample_indices)} samples")
        for index, seed, c in zip(job.sample_indices, job.seeds, outs):
            rows.append({
                "candidate_id": schema.candidate_id(round_, job.prompt_id, index),
                "prompt_id": job.prompt_id, "round": round_, "sample_index": index,
                "completion": c.text, "token_ids": c.token_ids, "num_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason, "anchor_logprob": c.anchor_logprob,
                "sample_logprob": c.sample_logprob, "anchor_hash": anchor_hash, "backend": backend,
                "sampling": params, "seed": seed,
            })
    return pa.Table.from_pylist(rows, schema=schema.CANDIDATES)
