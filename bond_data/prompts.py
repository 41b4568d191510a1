"""Prompts in: JSONL, Parquet or a `datasets` folder saved with `save_to_disk`.

Each record holds either `prompt` (plain text) or `messages` (a chat: a list of {role, content};
the generator applies the tokenizer's chat template). Everything is validated before anything is
written: bad input raises `PromptError` naming the file, the line (1-based; the row for Parquet
and datasets) and the field, and the store is unchanged. Duplicates are folded by `prompt_id`, a
hash of the content, within the file and against the store.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from bond_data import schema
from bond_data.files import write_parquet_atomic
from bond_data.store import Store, shard_manifest

ROLES = {"system", "user", "assistant", "tool"}


class PromptError(ValueError):
    """Invalid prompt input; the message says where."""


def _records(path: Path) -> Iterator[tuple[int, object]]:
    """(line or row number, record) from any supported input."""
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for a folder it cannot read
            raise PromptError(f"{path}: not a folder saved with datasets' save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise PromptError(f"{path}: a DatasetDict with splits {list(ds)}; pass one split's folder")
        yield from enumerate(ds, start=1)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    else:
        raise PromptError(f"{path}: unsupported input; give a .jsonl, a .parquet or a save_to_disk folder")


def _validate(path: Path, lineno: int, record: object) -> dict:
    where = f"{path}:{lineno}"
    if not isinstance(record, dict):
        raise PromptError(f"{where}: expected an object with 'prompt' or 'messages', got {type(record).__name__}")
    prompt, messages = record.get("prompt"), record.get("messages")
    if (prompt is None) == (messages is None):
        raise PromptError(f"{where}: exactly one of the fields 'prompt' or 'messages' must be set")
    if messages is None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"{where}: field 'prompt' must be a non-empty string, got {prompt!r:.60}")
        return {"prompt_id": schema.prompt_id(prompt, None), "prompt": prompt, "messages": None}
    if not isinstance(messages, list) or not messages:
        raise PromptError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise PromptError(
                f"{where}: field 'messages[{i}]' must be {{role: one of {sorted(ROLES)}, content: string}}, got {m!r:.80}"
            )
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = "\n".join(f"{m['role']}: {m['content']}" for m in clean)
    return {"prompt_id": schema.prompt_id(None, clean), "prompt": text, "messages": json.dumps(clean)}


def read_prompts(path: str | Path) -> pa.Table:
    """Validated, de-duplicated prompts of one input, in input order."""
    path = Path(path)
    if not path.exists():
        raise PromptError(f"{path}: no such file or folder")
    rows, seen = [], set()
    for lineno, record in _records(path):
        row = _validate(path, lineno, record)
        if row["prompt_id"] not in seen:
            seen.add(row["prompt_id"])
            rows.append({**row, "source": path.name})
    if not rows:
        raise PromptError(f"{path}: no prompts found")
    return pa.Table.from_pylist(rows, schema=schema.PROMPTS)


def add_prompts(store: Store, path: str | Path) -> dict:
    """Validate a prompt file and add the prompts the store does not have yet as one shard."""
    table = read_prompts(path)
    with store.writing(f"bond prompts add {Path(path).name}"):
        new = table.filter(pa.array(store.new_prompt_mask(table.column("prompt_id"))))
        summary = {"read": table.num_rows, "added": new.num_rows, "duplicates": table.num_rows - new.num_rows}
        if new.num_rows == 0:
            return summary
        shard_id = "prompts-" + schema.sha256_hex("\n".join(new.column("prompt_id").to_pylist()))
        out = store.root / "prompts" / f"part-{shard_id}.parquet"
        write_parquet_atomic(new, out)
        store.register_shards([shard_manifest(store.root, out, "prompts", shard_id)])
    return summary
