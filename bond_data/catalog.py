"""The catalog on disk: an append-only registry of Parquet manifests and a writer lease.

    <store>/_catalog/<table>/<ns>-batch-<pid>-<rand>.parquet   rows appended by one registration
    <store>/_catalog/<table>/<ns>-segment.parquet              COMPACT_AFTER batches up to <ns>, as one file
    <store>/_catalog/<table>/<ns>-base.parquet                 every row up to <ns>
    <store>/_catalog/empty/<view>.parquet                      typed zero-row files (views never read [])
    <store>/_catalog/writer.lock                               the writer lease (flock) and its holder

Why files and not a database: a DuckDB file opened for writing shuts out every other process,
readers included, and a reader holding it open shuts out the writer. Here nothing is ever locked
for reading: a registration writes one new small file (temporary name, fsync, rename), so a reader
sees a registration whole or not at all, and the cost of registering does not depend on how much
is registered. Every COMPACT_AFTER batches become one segment file and every MERGE_AFTER segments
are merged into a new base; files are deleted only once a newer file covers them and a grace period
has passed, so a reader never sees a row go missing. Readers (`store.sql`, DuckDB in memory) read
the newest base, the segments after it and the batches after the newest segment (names sort by
time: never more than MERGE_AFTER + COMPACT_AFTER small files besides the base), keeping per key
the first registration.

One writer at a time: `WriterLease` is an exclusive `flock` on `writer.lock`, which names its
holder (command, host, pid, start). The kernel drops the lock when the process dies, `kill -9`
included, so a dead writer never blocks the next run. (flock is reliable on local disks; on NFS
use one writer host.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bond_data.errors import StoreError
from bond_data.files import atomic_path

CATALOG_DIR = "_catalog"
COMPACT_AFTER = 256  # batch files that become one segment
MERGE_AFTER = 16  # segments merged into the base
GRACE_SECONDS = 60.0  # replaced files stay this long, for readers that listed them just before

_TS = pa.timestamp("us", tz="UTC")
TABLES: dict[str, tuple[str, pa.Schema]] = {  # table -> (key, schema)
    "shards": ("shard_id", pa.schema([
        ("shard_id", pa.string()), ("kind", pa.string()), ("round", pa.int32()), ("rm_id", pa.string()),
        ("path", pa.string()), ("num_rows", pa.int64()), ("sha256", pa.string()), ("manifest", pa.string()),
        ("registered_at", _TS)])),
    "rounds": ("round", pa.schema([
        ("round", pa.int32()), ("anchor_path", pa.string()), ("anchor_hash", pa.string()),
        ("parent_round", pa.int32()), ("config", pa.string()), ("registered_at", _TS)])),
    "reward_models": ("rm_id", pa.schema([
        ("rm_id", pa.string()), ("rm_hash", pa.string()), ("spec", pa.string()), ("registered_at", _TS)])),
    "datasets": ("dataset_id", pa.schema([
        ("dataset_id", pa.string()), ("round", pa.int32()), ("rm_id", pa.string()), ("n", pa.int32()),
        ("path", pa.string()), ("num_rows", pa.int64()), ("num_prompts", pa.int64()), ("card", pa.string()),
        ("registered_at", _TS)])),
}


def table_dir(root: Path, table: str) -> Path:
    return root / CATALOG_DIR / table


def now() -> datetime:
    return datetime.now(timezone.utc)


def _ns(path: Path) -> int:
    return int(path.name[:20])


def append(root: Path, table: str, rows: list[dict]) -> Path:
    """Register rows: one new manifest file, written atomically. Every COMPACT_AFTER batches become
    one segment, every MERGE_AFTER segments are merged into the base: the amortised cost stays
    flat however much the catalog holds (no listing of the folder on the way)."""
    _, schema = TABLES[table]
    folder = table_dir(root, table)
    state = _state(root, table)  # listed before our file exists
    path = folder / f"{time.time_ns():020d}-batch-{os.getpid()}-{uuid.uuid4().hex[:6]}.parquet"
    table_ = pa.Table.from_pylist([{"registered_at": now(), **r} for r in rows], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table_, tmp)
    state["batches"].append((path, table_))  # kept: a compaction need not read it back
    if len(state["batches"]) >= COMPACT_AFTER:
        segment = folder / f"{_ns(path):020d}-segment.parquet"
        _write_union(segment, state["batches"], table)
        state["segments"].append((segment, None))
        state["batches"] = []
        if len(state["segments"]) >= MERGE_AFTER:
            compact(root, table)
    return path


def _newest(folder: Path, kind: str) -> Path | None:
    files = sorted(folder.glob(f"*-{kind}.parquet"), key=_ns)
    return files[-1] if files else None


# Per (store, table), while this process holds the lease (the only writer): the segments newer than
# the newest base, and the batches newer than the newest segment (or base), with their rows when
# this process wrote them. Listed once, then kept up to date; forgotten when the lease is acquired
# anew (another writer may have appended meanwhile).
_STATE: dict[tuple[Path, str], dict[str, list[tuple[Path, pa.Table | None]]]] = {}


def _state(root: Path, table: str) -> dict[str, list[tuple[Path, pa.Table | None]]]:
    key = (root, table)
    if key not in _STATE:
        folder = table_dir(root, table)
        base = _newest(folder, "base")
        after_base = _ns(base) if base else -1
        segments = sorted((p for p in folder.glob("*-segment.parquet") if _ns(p) > after_base), key=_ns)
        after = _ns(segments[-1]) if segments else after_base
        batches = sorted((p for p in folder.glob("*-batch-*.parquet") if _ns(p) > after), key=_ns)
        _STATE[key] = {"segments": [(p, None) for p in segments], "batches": [(p, None) for p in batches]}
    return _STATE[key]


def _write_union(path: Path, sources: list[tuple[Path, pa.Table | None]], table: str) -> None:
    """The first registration of each key across `sources` (rows in memory, or read from disk)."""
    key, schema = TABLES[table]
    tables = [rows if rows is not None else pq.read_table(p, schema=schema) for p, rows in sources]
    with atomic_path(path) as tmp:
        pq.write_table(_first_per_key(pa.concat_tables(tables), key), tmp)


def compact(root: Path, table: str, grace: float = GRACE_SECONDS) -> Path | None:
    """Merge the newest base, the segments and the batches since into one new base, then delete the
    files it covers that are older than `grace` seconds: a reader that listed them a moment ago can
    still open them, and sees each row once whichever of them it reads."""
    folder = table_dir(root, table)
    state = _state(root, table)
    base = _newest(folder, "base")
    sources = ([(base, None)] if base else []) + state["segments"] + state["batches"]
    if not sources:
        return None
    if len(sources) > 1:
        base = folder / f"{_ns(sources[-1][0]):020d}-base.parquet"
        _write_union(base, sources, table)
    state["segments"], state["batches"] = [], []
    cutoff = time.time() - grace
    for f in folder.glob("*.parquet"):
        if f != base and _ns(f) <= _ns(base) and f.stat().st_mtime < cutoff:
            f.unlink(missing_ok=True)
    return base


def _first_per_key(rows: pa.Table, key: str) -> pa.Table:
    """The first registration of each key (as readers see it), so a base holds each row once."""
    order = pc.sort_indices(rows, [(key, "ascending"), ("registered_at", "ascending")])
    rows = rows.take(order)
    keys = rows.column(key).combine_chunks()
    if len(keys) < 2:
        return rows
    changed = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1)).fill_null(True)
    return rows.filter(pa.concat_arrays([pa.array([True]), changed]))


def ensure_layout(root: Path, empty_views: dict[str, pa.Schema]) -> None:
    """The catalog folders, a base file per table and a zero-row file per view (idempotent)."""
    for table, (_, schema) in TABLES.items():
        folder = table_dir(root, table)
        if not any(folder.glob("*.parquet")):
            with atomic_path(folder / f"{0:020d}-base.parquet") as tmp:
                pq.write_table(schema.empty_table(), tmp)
    for view, schema in empty_views.items():
        path = root / CATALOG_DIR / "empty" / f"{view}.parquet"
        if not path.is_file():
            with atomic_path(path) as tmp:
                pq.write_table(schema.empty_table(), tmp)


# ---- the writer lease ------------------------------------------------------------------------
_HELD: dict[Path, list] = {}  # store root -> [fd, depth]: re-entrant within one process
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def writer_lease(root: Path, command: str) -> Iterator[None]:
    """Hold the store's writer lease for the block, or fail at once naming the holder.

    Re-entrant within a process (a flow's stages run inside `bond rounds`'s lease)."""
    lock = root / CATALOG_DIR / "writer.lock"
    with _HELD_LOCK:
        if root in _HELD:
            _HELD[root][1] += 1
        else:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise StoreError(
                    f"store {root} is being written by `{holder.get('command', '?')}` (host {holder.get('host', '?')}, "
                    f"pid {holder.get('pid', '?')}, since {holder.get('started', '?')}); one writer at a time: "
                    "wait for it to finish, or stop it") from None
            for stale in [k for k in _STATE if k[0] == root]:  # another writer may have appended since
                del _STATE[stale]
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"command": command, "host": socket.gethostname(), "pid": os.getpid(),
                                      "started": now().isoformat(timespec="seconds")}).encode(), 0)
            _HELD[root] = [fd, 1]
    try:
        yield
    finally:
        with _HELD_LOCK:
            _HELD[root][1] -= 1
            if _HELD[root][1] == 0:
                fd = _HELD.pop(root)[0]
                os.close(fd)  # releases the flock


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def holds_lease(root: Path) -> bool:
    with _HELD_LOCK:
        return root in _HELD
