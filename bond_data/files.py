"""Files on disk: content hashes, and writes that a reader (or a crash) sees whole or not at all.

Every writer in the project goes through `atomic_path`: write under a temporary sibling name
(`.<name>.tmp-<random>`), fsync, then one `os.replace`. A leftover temporary name is the trace of
a killed writer; `is_temporary` recognises it so the store can delete it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from bond_data.errors import StoreError

if TYPE_CHECKING:  # pyarrow starts native threads when imported: `bond sql` imports it later
    import pyarrow as pa

CHECKPOINT_EXTRAS = ("trainer_state.pt", "manifest.json")  # beside a model, not part of its identity


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: Path, exclude: tuple[str, ...] = CHECKPOINT_EXTRAS) -> str:
    """Content hash of a model folder: every file's relative path and bytes, in sorted order
    (hidden files and the trainer's own state and manifest excluded)."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(folder).rglob("*")
                   if p.is_file() and not p.name.startswith(".") and p.name not in exclude)
    if not files:
        raise StoreError(f"{folder}: empty or missing checkpoint folder")
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def is_temporary(path: Path) -> bool:
    """A name `atomic_path` writes to before the rename."""
    return path.name.startswith(".") and ".tmp-" in path.name


def _fsync_tree(path: Path) -> None:
    for f in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, in every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _share(path: Path) -> None:
    """Give what we wrote the umask's usual modes (0644 files, 0755 folders with the default umask):
    some writers (safetensors, tempfile) create 0600 files that a teammate sharing the store
    could not read."""
    umask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_path(path: Path, keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write a file or a folder into; when the block ends
    without an exception, fsync it and rename it over `path` (an existing folder is replaced).

    `keep_existing(path)` true at that moment (say, a concurrent builder finished first) keeps the
    existing `path` and discards ours. The temporary is removed in every case.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if keep_existing is not None and keep_existing(path):
            return
        _fsync_tree(tmp)
        _share(tmp)
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)  # rename cannot replace a non-empty folder
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_text_atomic(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
