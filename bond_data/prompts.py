"""Prompts in: JSONL, Parquet or a `datasets` folder saved with `save_to_disk`.

Each record holds either `prompt` (plain text) or `messages` (a chat: a list of {role, content};
the generator applies the tokenizer's chat template). Everything is validated before anything is
written: bad input raises `PromptError` naming the file, the line (1-based; the row for Parquet
and datasets) and the field, and the store is unchanged. Duplicates are folded by `prompt_id`, a
hash of the content, within the file and against the store.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from bond_data import schema
from bond_data.files import write_parquet_atomic
from bond_data.store import Store, shard_manifest

ROLES = {"system", "user", "assistant", "tool"}


class PromptError(ValueError):
    """Invalid prompt input; the message says where."""


MAX_LINE_BYTES = 1 << 20  # one prompt record; a longer line is not a prompt (or not JSONL)
MAX_DEPTH = 32  # JSON nesting: a prompt is an object with a list of messages


def _check_regular(path: Path) -> None:
    """Refuse what is not a plain file (a FIFO blocks forever, /dev/zero never ends)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise PromptError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise PromptError(f"{path}: not a regular file (a FIFO, device or socket); give a .jsonl or .parquet file")


def _decode(path: Path, lineno: int, raw: bytes) -> str:
    if lineno == 1 and raw.startswith(b"\x1f\x8b"):
        raise PromptError(f"{path}: gzip-compressed; decompress it first (gunzip)")
    if lineno == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise PromptError(f"{path}: UTF-16 text; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a UTF-8 BOM is fine
    except UnicodeDecodeError as e:
        raise PromptError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None


def _depth(value: object, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of parsed JSON, without recursion past `limit`."""
    stack, deepest = [(value, 1)], 0
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children)
    return deepest


def _json_lines(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise PromptError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES} bytes; not a prompt record")
            line = _decode(path, lineno, raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise PromptError(f"{path}:{lineno}: JSON nested deeper than {MAX_DEPTH} levels") from None
            except ValueError as e:  # e.g. an integer of thousands of digits
                raise PromptError(f"{path}:{lineno}: invalid JSON ({str(e).splitlines()[0][:80]})") from None
            if _depth(record) > MAX_DEPTH:
                raise PromptError(f"{path}:{lineno}: JSON nested deeper than {MAX_DEPTH} levels")
            yield lineno, record


def _records(path: Path) -> Iterator[tuple[int, object]]:
    """(line or row number, record) from any supported input."""
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for a folder it cannot read
            raise PromptError(f"{path}: not a folder saved with datasets' save_to_disk ({str(e).splitlines()[0][:120]})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise PromptError(f"{path}: a DatasetDict with splits {list(ds)}; pass one split's folder")
        yield from enumerate(ds, start=1)
        return
    _check_regular(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise PromptError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:120]})") from None
        yield from enumerate(rows, start=1)
    elif path.suffix in (".jsonl", ".json"):
        try:
            yield from _json_lines(path)
        except OSError as e:
            raise PromptError(f"{path}: cannot read ({e.strerror})") from None
    else:
        raise PromptError(f"{path}: unsupported input; give a .jsonl, a .parquet or a save_to_disk folder")


def _check_text(where: str, field: str, text: str) -> None:
    """Text that Parquet can store: no lone surrogate from a broken \\ud800-style escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptError(f"{where}: field '{field}' holds an invalid Unicode escape (a lone surrogate)") from None


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
        _check_text(where, "prompt", prompt)
        return {"prompt_id": schema.prompt_id(prompt, None), "prompt": prompt, "messages": None}
    if not isinstance(messages, list) or not messages:
        raise PromptError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise PromptError(
                f"{where}: field 'messages[{i}]' must be {{role: one of {sorted(ROLES)}, content: string}}, got {m!r:.80}"
            )
        _check_text(where, f"messages[{i}].content", m["content"])
    if messages[-1]["role"] == "assistant":
        raise PromptError(f"{where}: field 'messages[{len(messages) - 1}]': a prompt cannot end with an assistant "
                          "turn (the generator writes the assistant's reply); end with a user turn")
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
