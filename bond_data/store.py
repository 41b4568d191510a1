"""The store: immutable Parquet shards under a folder, indexed by a DuckDB catalog. All SQL lives here.

    <store>/catalog.duckdb                        rounds, shards, reward models, datasets; views
    <store>/prompts/part-<id>.parquet
    <store>/candidates/round=R/shard=<id>.parquet
    <store>/scores/round=R/rm=<rm>/shard=<id>.parquet
    <store>/datasets/round=R/<id>/part-0.parquet  + README.md (dataset card)
    <store>/anchors/round=R/                      safetensors checkpoint + manifest

Workers only write Parquet (temporary name, fsync, atomic rename) and return a manifest. Only the
driver writes the catalog, registering shards in one transaction that also rebuilds the views over
the registered files, so a reader never sees an unregistered or half-written shard. A file on disk
that the catalog does not list is an orphan of a killed run: the driver deletes it before planning.

Views hold paths relative to the store; every connection sets DuckDB's `file_search_path` to the
store folder, so the store can be moved or opened from any working directory.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from bond_data import schema
from bond_data.errors import StoreError
from bond_data.files import file_sha256, is_temporary

__all__ = ["Store", "StoreError", "read_only_query", "shard_manifest"]

TABLES = """
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, anchor_path VARCHAR NOT NULL, anchor_hash VARCHAR NOT NULL,
    parent_round INTEGER, config JSON, registered_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS shards (
    shard_id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, round INTEGER, rm_id VARCHAR,
    path VARCHAR NOT NULL, num_rows BIGINT NOT NULL, sha256 VARCHAR NOT NULL, manifest JSON,
    registered_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS reward_models (
    rm_id VARCHAR PRIMARY KEY, rm_hash VARCHAR NOT NULL, spec VARCHAR NOT NULL,
    registered_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS datasets (
    dataset_id VARCHAR PRIMARY KEY, round INTEGER NOT NULL, rm_id VARCHAR NOT NULL, n INTEGER NOT NULL,
    path VARCHAR NOT NULL, num_rows BIGINT NOT NULL, num_prompts BIGINT NOT NULL, card JSON,
    registered_at TIMESTAMP DEFAULT current_timestamp);
"""

# One row per candidate and reward model, with its quantiles within its (round, prompt, rm) pool.
# Count each reward level of a pool, take the running sum over levels (<=), subtract the level's
# own count (<), and join back: the window runs over distinct levels, not over every candidate,
# which made it 1.3x faster than rank() / count(*) windows over all rows (bench/weights.py).
POOL_VIEW = """
CREATE OR REPLACE VIEW pool AS
WITH levels AS (
    SELECT round, prompt_id, rm_id, reward, count(*) AS c FROM scores GROUP BY ALL),
cumulative AS (
    SELECT round, prompt_id, rm_id, reward, c,
           sum(c) OVER (PARTITION BY round, prompt_id, rm_id ORDER BY reward) AS le,
           sum(c) OVER (PARTITION BY round, prompt_id, rm_id) AS k
    FROM levels)
SELECT s.round, s.prompt_id, s.candidate_id, s.rm_id, s.reward,
       ((q.le - q.c) / q.k)::DOUBLE AS p_lt, (q.le / q.k)::DOUBLE AS p_le, q.k::BIGINT AS k
FROM scores s JOIN cumulative q USING (round, prompt_id, rm_id, reward);
CREATE OR REPLACE MACRO bon_pool(n) AS TABLE
SELECT *, (pow(p_le, n) - pow(p_lt, n)) / (p_le - p_lt) AS bon_weight FROM pool;
"""

DATASET_ROWS = """
SELECT b.prompt_id, b.candidate_id, p.prompt, p.messages, c.completion, c.token_ids, b.reward, b.p_lt, b.p_le,
       b.bon_weight, c.anchor_logprob, c.num_tokens, b.round, $n::INTEGER AS n, b.rm_id
FROM bon_pool($n) b
JOIN candidates c USING (candidate_id)
JOIN prompts p ON p.prompt_id = b.prompt_id
WHERE b.round = $round AND b.rm_id = $rm_id
ORDER BY b.prompt_id, c.sample_index
"""

VIEW_TABLES = {"prompts": schema.PROMPTS, "candidates": schema.CANDIDATES, "scores": schema.SCORES}
_DUCK_TYPES = {
    pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float64(): "DOUBLE",
    pa.list_(pa.int32()): "INTEGER[]",
}
ALLOWED_READ_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def shard_manifest(store_root: Path, path: Path, kind: str, shard_id: str, **extra) -> dict:
    """What a worker returns after writing a shard; the driver registers it."""
    meta = pq.read_metadata(path)
    return {
        "shard_id": shard_id,
        "kind": kind,
        "path": path.relative_to(store_root).as_posix(),
        "num_rows": meta.num_rows,
        "sha256": file_sha256(path),
        **extra,
    }


class Store:
    """A store folder and its catalog. Connections are short-lived so readers are rarely locked out."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.catalog_path = self.root / "catalog.duckdb"

    # ---- connections -------------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.catalog_path.exists():
            raise StoreError(f"no catalog at {self.catalog_path}: is {self.root} a BOND store?")
        self.root.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(self.catalog_path), read_only=read_only)
        try:
            con.execute("SET file_search_path = ?", [str(self.root)])
            if not read_only:
                self._ensure_schema(con)
            yield con
        finally:
            con.close()

    def _ensure_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        if con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'pool'").fetchall()[0][0]:
            return
        con.execute(TABLES)
        self._refresh_views(con)

    def _refresh_views(self, con: duckdb.DuckDBPyConnection) -> None:
        """Point each view at exactly the registered shard files (or an empty typed relation)."""
        for kind, sch in VIEW_TABLES.items():
            paths = [r[0] for r in con.execute("SELECT path FROM shards WHERE kind = ? ORDER BY path", [kind]).fetchall()]
            if paths:
                # Paths are our own relative names (checked at registration), quoted as SQL literals.
                listing = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
                body = f"SELECT * FROM read_parquet([{listing}])"
            else:
                cols = ", ".join(f"NULL::{_DUCK_TYPES[f.type]} AS {f.name}" for f in sch)
                body = f"SELECT {cols} WHERE false"
            con.execute(f"CREATE OR REPLACE VIEW {kind} AS {body}")
        con.execute(POOL_VIEW)

    # ---- shards ------------------------------------------------------------------------------
    def register_shards(self, manifests: list[dict]) -> None:
        """Register finished shards and rebuild the views, all in one transaction."""
        if not manifests:
            return
        for m in manifests:
            path = self.root / m["path"]
            if not path.is_file() or ".." in Path(m["path"]).parts:
                raise StoreError(f"shard {m['shard_id']}: file {path} is missing or outside the store")
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                for m in manifests:
                    con.execute(
                        "INSERT INTO shards (shard_id, kind, round, rm_id, path, num_rows, sha256, manifest) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        [m["shard_id"], m["kind"], m.get("round"), m.get("rm_id"), m["path"],
                         m["num_rows"], m["sha256"], json.dumps(m)],
                    )
                self._refresh_views(con)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def registered_shards(self, kind: str, round_: int | None = None, rm_id: str | None = None) -> list[dict]:
        with self.connect() as con:
            rows = con.execute(
                "SELECT manifest FROM shards WHERE kind = $kind "
                "AND ($round IS NULL OR round = $round) AND ($rm IS NULL OR rm_id = $rm) ORDER BY path",
                {"kind": kind, "round": round_, "rm": rm_id},
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def remove_orphans(self, subdir: str) -> list[Path]:
        """Delete Parquet files under `subdir` that the catalog does not list (and temp files)."""
        folder = self.root / subdir
        if not folder.exists():
            return []
        with self.connect() as con:
            known = {r[0] for r in con.execute("SELECT path FROM shards").fetchall()}
        removed = []
        for path in folder.rglob("*"):
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and (is_temporary(path) or (path.suffix == ".parquet" and rel not in known)):
                path.unlink()
                removed.append(path)
        return removed

    # ---- reads for planning --------------------------------------------------------------------
    def query(self, sql: str, params: dict | list | None = None) -> pa.Table:
        """Run one of *our* queries read-only and return an Arrow table."""
        with self.connect(read_only=True) as con:
            return con.sql(sql, params=params or []).to_arrow_table()

    def prompts(self) -> pa.Table:
        return self.query("SELECT * FROM prompts ORDER BY prompt_id")

    def prompt_ids(self) -> set[str]:
        if not self.catalog_path.exists():
            return set()
        return set(self.query("SELECT prompt_id FROM prompts").column("prompt_id").to_pylist())

    def existing_samples(self, round_: int) -> pa.Table:
        """(prompt_id, sample_index) of every registered candidate of a round."""
        return self.query("SELECT prompt_id, sample_index FROM candidates WHERE round = ?", [round_])

    def dataset_rows(self, round_: int, rm_id: str, n: int) -> pa.Table:
        table = self.query(DATASET_ROWS, {"round": round_, "rm_id": rm_id, "n": n})
        return table.cast(schema.DATASET)

    # ---- rounds, reward models, datasets -------------------------------------------------------
    def register_anchor(self, round_: int, anchor_path: str, anchor_hash: str,
                        parent_round: int | None = None, config: dict | None = None) -> None:
        """Register the anchor (generator) of a round; idempotent for the same hash."""
        with self.connect() as con:
            row = con.execute("SELECT anchor_hash FROM rounds WHERE round = ?", [round_]).fetchall()
            if row and row[0][0] != anchor_hash:
                raise StoreError(
                    f"round {round_} already has anchor {row[0][0]}; refusing to replace it with {anchor_hash}"
                )
            if not row:
                con.execute(
                    "INSERT INTO rounds (round, anchor_path, anchor_hash, parent_round, config) VALUES (?, ?, ?, ?, ?)",
                    [round_, anchor_path, anchor_hash, parent_round, json.dumps(config or {})],
                )

    def anchor(self, round_: int) -> dict | None:
        if not self.catalog_path.exists():
            return None
        rows = self.query("SELECT round, anchor_path, anchor_hash FROM rounds WHERE round = ?", [round_]).to_pylist()
        return rows[0] if rows else None

    def register_reward_model(self, rm_id: str, rm_hash: str, spec: str) -> None:
        with self.connect() as con:
            row = con.execute("SELECT rm_hash, spec FROM reward_models WHERE rm_id = ?", [rm_id]).fetchall()
            if row and row[0][0] != rm_hash:
                raise StoreError(
                    f"reward model id {rm_id!r} is registered with hash {row[0][0]} ({row[0][1]}); "
                    f"{spec} hashes to {rm_hash}. Give the changed reward model a new --rm-id."
                )
            if not row:
                con.execute("INSERT INTO reward_models (rm_id, rm_hash, spec) VALUES (?, ?, ?)", [rm_id, rm_hash, spec])

    def reward_model_ids(self, round_: int) -> list[str]:
        rows = self.query("SELECT DISTINCT rm_id FROM shards WHERE kind = 'scores' AND round = ? ORDER BY 1", [round_])
        return rows.column("rm_id").to_pylist()

    def register_dataset(self, record: dict) -> None:
        with self.connect() as con:
            con.execute(
                "INSERT INTO datasets (dataset_id, round, rm_id, n, path, num_rows, num_prompts, card) "
                "VALUES ($dataset_id, $round, $rm_id, $n, $path, $num_rows, $num_prompts, $card) ON CONFLICT DO NOTHING",
                {**record, "card": json.dumps(record["card"])},
            )


def read_only_query(store: Store, sql: str) -> pa.Table:
    """Run an analyst's SQL: only SELECT / EXPLAIN statements, on a read-only connection.

    Checking the statement type first matters: a read-only connection still lets COPY ... TO or
    ATTACH write files outside the catalog.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise StoreError(f"SQL does not parse: {e}") from None
    if not statements:
        raise StoreError("no SQL statement given")
    for st in statements:
        if st.type not in ALLOWED_READ_STATEMENTS:
            raise StoreError(
                f"bond sql is read-only: refusing a {st.type.name} statement ({st.query.strip()[:60]!r}); "
                "only SELECT, DESCRIBE/SHOW and EXPLAIN are allowed"
            )
    with store.connect(read_only=True) as con:
        result = None
        for st in statements:
            try:
                result = con.sql(st.query).to_arrow_table()
            except duckdb.Error as e:
                raise StoreError(f"SQL error: {e}") from None
        return result
