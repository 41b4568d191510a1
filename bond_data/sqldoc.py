"""The SQL reference (docs/sql.md): `DESCRIBE` of every view and table a reader of the store sees,
with what one row is and what each column means.

The column types come from DuckDB itself, on a real store made by this version (empty: the views
read typed zero-row files, so their columns do not depend on the data); a test regenerates the page
and compares it with docs/sql.md, and fails on a column without a meaning here, so the reference
cannot drift from the views. Regenerate it with

    python -m bond_data.sqldoc > docs/sql.md
"""

from __future__ import annotations

import sys
import tempfile

from bond_data.store import Store

# name -> (what DESCRIBE runs on, one row per ...), in the order of the page
RELATIONS = {
    "prompts": ("prompts", "prompt (de-duplicated by content)"),
    "candidates": ("candidates", "sampled completion (candidate) of a round"),
    "scores": ("scores", "candidate and reward model"),
    "pool": ("pool", "candidate and reward model, with its quantiles within its (round, prompt, reward model) pool"),
    "bon_pool(n)": ("FROM bon_pool(8)", "as `pool`, with the Best-of-n weights (a table macro: `FROM bon_pool(8)`)"),
    "datasets": ("datasets", "built dataset (catalog table, with its card's fields as columns)"),
    "dataset_rows": ("dataset_rows", "row of every built dataset (what `bond export` writes), with its dataset's id"),
    "rounds": ("rounds", "round with a registered anchor (catalog table)"),
    "shards": ("shards", "registered Parquet file: prompts, candidates or scores shard (catalog table)"),
    "reward_models": ("reward_models", "reward model, registered with its first scored shard (catalog table)"),
}

# What a column means, wherever it appears (a relation-specific meaning as "relation.column").
COLUMNS = {
    "prompt_id": "sha256 of the prompt's content (16 hex): text and chat prompts never collide",
    "prompt": "the prompt as plain text (a chat prompt as `role: content` lines)",
    "prompts.messages": "a chat prompt as JSON text `[{\"role\", \"content\"}, ...]`; NULL for a plain prompt",
    "messages": "a chat prompt as a list of `{role, content}` structs; NULL for a plain prompt",
    "source": "the file the prompt was added from",
    "candidate_id": "hash of (round, prompt_id, sample_index): the same on every re-run",
    "round": "the round (its anchor generated the candidates)",
    "sample_index": "0 .. k-1 within the prompt's pool",
    "completion": "the generated text",
    "token_ids": "the completion's token ids as generated (EOS included), in the anchor's tokenizer",
    "num_tokens": "length of `token_ids`",
    "finish_reason": "`stop` (EOS) or `length` (max_new_tokens reached)",
    "anchor_logprob": "log A(y): the completion's log-probability under the anchor at temperature 1",
    "sample_logprob": "the completion's log-probability under the sampler actually used (temperature, top_p)",
    "target_logprob": "log of the policy whose Best-of-n is the target: `anchor_logprob`, or `sample_logprob` "
                      "for target `sampler`",
    "anchor_hash": "content hash of the anchor checkpoint that generated the candidates",
    "backend": "`transformers` or `vllm`",
    "sampling": "JSON: temperature, top_p, max_new_tokens, precision and attention (how log A was computed)",
    "seed": "the candidate's sampling seed, hashed from (round, prompt_id, sample_index)",
    "rm_id": "the reward model's id in the store",
    "rm_hash": "content hash of the reward model (folder, or the callable's module source)",
    "reward": "the reward model's score of the completion",
    "p_lt": "fraction of the pool with a smaller reward (`lt / k`)",
    "p_le": "fraction of the pool with a smaller or equal reward, the candidate itself included (`le / k`)",
    "k": "the pool's size: candidates of the prompt in this round scored by this reward model",
    "lt": "pool rewards smaller than the candidate's",
    "le": "pool rewards smaller than or equal to the candidate's (itself included)",
    "bon_weight": "Best-of-n weight of the chosen weighting (`bon_pool(n)`: unbiased, NULL where n > k); "
                  "per prompt `bon_weight / k` sums to 1",
    "bon_weight_pool": "the pool weighting `(p_le^n - p_lt^n) / (p_le - p_lt)`: never 0",
    "n": "the N of Best-of-N",
    "dataset_id": "readable (n, weighting, target, reward model) and a hash of what determines the rows",
    "weighting": "`unbiased` or `pool` (datasets built before weightings existed: `pool`)",
    "target": "`anchor` or `sampler`",
    "license": "the card's license (set at build: `license` key, `--license` flag)",
    "path": "the file, relative to the store",
    "num_rows": "rows in the file",
    "num_prompts": "prompts in the dataset",
    "card": "JSON: the build's summary, weighting, target, license, anchor hash",
    "registered_at": "when it was registered (the first registration of a key wins)",
    "k_min": "the smallest pool in the dataset",
    "k_max": "the largest pool in the dataset",
    "tie_rate": "fraction of candidates whose reward ties another in its pool",
    "ess_mean": "effective sample size of the weights per prompt, `(sum w)^2 / sum w^2`, mean over prompts",
    "mean_reward": "mean reward of one sample of the anchor (mean over prompts)",
    "bon_reward": "Best-of-n reward the weights target, `sum w r / k` (mean over prompts)",
    "anchor_path": "the anchor checkpoint's folder",
    "parent_round": "the round whose training produced this anchor (NULL for round 0)",
    "config": "JSON: how the anchor was registered (the training settings)",
    "shard_id": "the shard's id (a scores shard: its candidates shard's id and the reward model)",
    "kind": "`prompts`, `candidates` or `scores`",
    "sha256": "the file's sha256",
    "manifest": "JSON: the worker's manifest of the shard",
    "spec": "how the reward model was given: a folder or `module:function`",
}


def meaning(relation: str, column: str) -> str:
    return COLUMNS.get(f"{relation}.{column}") or COLUMNS[column]


def describe(store: Store) -> dict[str, list[dict]]:
    """name -> DESCRIBE rows (column_name, column_type) of every relation a reader sees."""
    with store.reader() as con:
        return {name: con.sql(f"DESCRIBE {target}").to_arrow_table().select(["column_name", "column_type"]).to_pylist()
                for name, (target, _) in RELATIONS.items()}


def render(store: Store) -> str:
    lines = ["# SQL reference: the views and tables of a store", "",
             "What `bond sql`, `store.sql` (DuckDB CLI, notebooks) and `Store.query` see: `DESCRIBE` of each view",
             "and table on a store of this version. Generated by `python -m bond_data.sqldoc > docs/sql.md`;",
             "`tests/bond_data/test_sql_docs.py` regenerates it and fails when it differs.", ""]
    for name, columns in describe(store).items():
        lines += [f"## `{name}`", "", f"One row per {RELATIONS[name][1]}.", "",
                  "| column | type | meaning |", "|---|---|---|"]
        lines += [f"| `{c['column_name']}` | `{c['column_type']}` | {meaning(name, c['column_name'])} |" for c in columns]
        lines.append("")
    return "\n".join(lines)


def render_fresh() -> str:
    """The page, from an empty store made here (the columns do not depend on the data)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        with store.writing("bond_data.sqldoc"):
            pass
        return render(store)


if __name__ == "__main__":
    sys.stdout.write(render_fresh())
