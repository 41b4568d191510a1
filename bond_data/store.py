"""The store: immutable Parquet shards under a folder, indexed by an append-only catalog. All SQL
lives here.

    <store>/store.sql                             the reader script: DuckDB views over the catalog
    <store>/_catalog/                             registry manifests and the writer lease (catalog.py)
    <store>/prompts/part-<id>.parquet
    <store>/candidates/round=R/shard=<id>.parquet
    <store>/scores/round=R/rm=<rm>/shard=<id>.parquet
    <store>/datasets/round=R/<id>/part-0.parquet  + README.md (dataset card)
    <store>/anchors/round=R/                      safetensors checkpoint + manifest

Writers: workers only write Parquet (temporary name, fsync, atomic rename) and return a manifest;
the driver, holding the store's writer lease, registers each finished shard by appending one
manifest file to the catalog. A registered shard is done. A file on disk that the catalog does not
list is an orphan of a killed run: the driver deletes it before planning.

Readers never touch a lock: every read opens DuckDB in memory and runs the reader script
(`reader_script`, also written to `<store>/store.sql` for the DuckDB CLI and notebooks). It loads
the catalog tables as they are at that moment and points the views at exactly the registered
files, by absolute path, so a reader sees a consistent snapshot: only registered, complete shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from bond_data import catalog, schema
from bond_data.errors import StoreError
from bond_data.files import file_sha256, is_temporary, write_text_atomic

__all__ = ["QueryInterrupted", "QueryTimeout", "Store", "StoreError", "check_read_only", "read_only_query", "reader_script", "shard_manifest"]

VIEWS = {"prompts": schema.PROMPTS, "candidates": schema.CANDIDATES, "scores": schema.SCORES}
EMPTY_FILES = {**VIEWS, "dataset_rows": schema.DATASET}  # typed zero-row files: a view never reads []

# Catalog tables as readers see them: the `datasets` registrations gain the card's fields as columns
# (weighting, target, license, anchor and the build's summary), so an analyst compares datasets
# without JSON. Datasets registered before a field existed read NULL there (weighting: pool).
CATALOG_COLUMNS = {"datasets": """, coalesce(card->>'$.weighting', 'pool') AS weighting,
    coalesce(card->>'$.target', 'anchor') AS target, card->>'$.license' AS license, card->>'$.anchor_hash' AS anchor_hash,
    (card->>'$.k_min')::INTEGER AS k_min, (card->>'$.k_max')::INTEGER AS k_max, (card->>'$.tie_rate')::DOUBLE AS tie_rate,
    (card->>'$.ess_mean')::DOUBLE AS ess_mean, (card->>'$.mean_reward')::DOUBLE AS mean_reward,
    (card->>'$.bon_reward')::DOUBLE AS bon_reward"""}

# Every row of every registered dataset, with its dataset's id, weighting and target: the weights an
# analyst compares across datasets (union by name: datasets of older versions lack some columns).
# Only registered files that are there (a listing of datasets/, joined): a dataset folder deleted by
# hand drops out of the view instead of breaking every query.
DATASET_ROWS_VIEW = """
SET VARIABLE bond_dataset_rows = (SELECT coalesce(list(g.file ORDER BY g.file), [])
    FROM glob('{r}/datasets/*/*/*.parquet') g JOIN datasets d ON g.file = '{r}/' || d.path);
CREATE OR REPLACE TEMP VIEW dataset_rows AS
SELECT d.dataset_id, d.weighting, d.target, r.* EXCLUDE (filename)
FROM read_parquet(list_concat(['{r}/{catalog}/empty/dataset_rows.parquet'], getvariable('bond_dataset_rows')),
                  union_by_name = true, filename = true, hive_partitioning = false) r
JOIN datasets d ON r.filename = '{r}/' || d.path;
"""

# One row per candidate and reward model, with its quantiles within its (round, prompt, rm) pool.
# Count each reward level of a pool, take the running sum over levels (<=), subtract the level's
# own count (<), and join back: the window runs over distinct levels, not over every candidate,
# which made it 1.3x faster than rank() / count(*) windows over all rows (bench/weights.py).
#
# `bon_pool(n)` adds both Best-of-n weightings (bond_data/bon.py is the numpy reference):
#   bon_weight       unbiased: k (C(le, n) - C(lt, n)) / (C(k, n) (le - lt)); NULL where n > k.
#                    C(a, n) / C(k, n) as exp of lgamma sums (lgamma arguments kept >= 1: the DuckDB
#                    1.5 CLI refuses lgamma(0)); without a tie (le - lt = 1) the one-term form
#                    n C(le-1, n-1) / C(k-1, n-1), with no subtraction. Relative error about
#                    1e-16 * lgamma(k), 1e-9 at k = 10^6; numpy is exact to 1e-12 there.
#   bon_weight_pool  pool: (p_le^n - p_lt^n) / (p_le - p_lt), Best-of-n with replacement; never 0.
POOL_VIEW = """
CREATE OR REPLACE TEMP VIEW pool AS
WITH levels AS (
    SELECT round, prompt_id, rm_id, reward, count(*) AS c FROM scores GROUP BY ALL),
cumulative AS (
    SELECT round, prompt_id, rm_id, reward, c,
           sum(c) OVER (PARTITION BY round, prompt_id, rm_id ORDER BY reward) AS le,
           sum(c) OVER (PARTITION BY round, prompt_id, rm_id) AS k
    FROM levels)
SELECT s.round, s.prompt_id, s.candidate_id, s.rm_id, s.reward,
       ((q.le - q.c) / q.k)::DOUBLE AS p_lt, (q.le / q.k)::DOUBLE AS p_le, q.k::BIGINT AS k,
       (q.le - q.c)::BIGINT AS lt, q.le::BIGINT AS le
FROM scores s JOIN cumulative q USING (round, prompt_id, rm_id, reward);
CREATE OR REPLACE TEMP MACRO bon_choose_ratio(a, n, k) AS
    CASE WHEN a >= n THEN exp(lgamma(greatest(a, 0) + 1) - lgamma(greatest(a - n, 0) + 1)
                              - lgamma(k + 1) + lgamma(greatest(k - n, 0) + 1)) ELSE 0 END;
CREATE OR REPLACE TEMP MACRO unbiased_bon_weight(lt, le, k, n) AS
    CASE WHEN n > k THEN NULL
         WHEN le - lt = 1 THEN n * bon_choose_ratio(le - 1, n - 1, k - 1)
         ELSE k * (bon_choose_ratio(le, n, k) - bon_choose_ratio(lt, n, k)) / (le - lt) END;
CREATE OR REPLACE TEMP MACRO pool_bon_weight(p_lt, p_le, n) AS (pow(p_le, n) - pow(p_lt, n)) / (p_le - p_lt);
CREATE OR REPLACE TEMP MACRO bon_pool(n) AS TABLE
SELECT *, unbiased_bon_weight(lt, le, k, n) AS bon_weight, pool_bon_weight(p_lt, p_le, n) AS bon_weight_pool
FROM pool;
"""

# The dataset of a round, streamed by COPY (parameters as variables: COPY takes no bound values).
# `bon_weight` is the chosen weighting (the trainer's forward term), `bon_weight_pool` the pool one
# (inside the backward term's log: never 0); `target_logprob` is log of the policy whose Best-of-n
# is the target: the anchor (temperature 1), or with target 'sampler' the sampler that drew the pool.
# `messages` is stored in the prompts as JSON text; datasets carry it as a list of {role, content}
# structs, the shape chat datasets have in `datasets` and TRL.
DATASET_ROWS = """
SELECT b.prompt_id, b.candidate_id, p.prompt,
       from_json(p.messages, '[{"role": "VARCHAR", "content": "VARCHAR"}]') AS messages, c.completion, c.token_ids, b.reward, b.p_lt, b.p_le,
       CASE getvariable('bond_weighting') WHEN 'pool' THEN b.bon_weight_pool ELSE b.bon_weight END AS bon_weight,
       b.bon_weight_pool, c.anchor_logprob,
       CASE getvariable('bond_target') WHEN 'sampler' THEN c.sample_logprob ELSE c.anchor_logprob END AS target_logprob,
       c.num_tokens, b.round::INTEGER AS round, getvariable('bond_n')::INTEGER AS n, b.rm_id, c.anchor_hash
FROM bon_pool(getvariable('bond_n')) b
JOIN candidates c ON c.candidate_id = b.candidate_id AND c.round = getvariable('bond_round')
JOIN prompts p ON p.prompt_id = b.prompt_id
WHERE b.round = getvariable('bond_round') AND b.rm_id = getvariable('bond_rm_id')
ORDER BY b.prompt_id, c.sample_index
"""

# The smallest pool of a round (unbiased weights need n <= k) and the sampling settings its
# candidates were drawn with (BOND's target is Best-of-n of the anchor: temperature 1, top_p 1).
POOL_SIZES = "SELECT min(k) AS k_min, count(DISTINCT prompt_id) AS prompts FROM pool WHERE round = $round AND rm_id = $rm"
SAMPLING_SETTINGS = "SELECT DISTINCT sampling FROM candidates WHERE round = $round ORDER BY 1"
BACKENDS = "SELECT DISTINCT backend FROM candidates WHERE round = $round ORDER BY 1"

# Prompts, candidates, tie rate, effective sample size and rewards of a built dataset, in SQL so
# that a dataset of millions of rows is summarised without loading it (bond_data.build checks it
# against the numpy version).
DATASET_SUMMARY = """
WITH rows AS (SELECT *, count(*) OVER (PARTITION BY prompt_id) AS k FROM read_parquet($path)),
per_prompt AS (
    SELECT prompt_id, any_value(k) AS k, sum(bon_weight) AS w, sum(bon_weight * bon_weight) AS w2,
           avg(reward) AS one_sample, sum(bon_weight * reward) / any_value(k) AS best_of_n,
           count_if((p_le - p_lt) * k > 1.5) AS tied
    FROM rows GROUP BY prompt_id)
SELECT count(*) AS prompts, sum(k)::BIGINT AS candidates, min(k) AS k_min, max(k) AS k_max,
       sum(tied) / sum(k) AS tie_rate, avg(w * w / w2) AS ess_mean, avg(w * w / w2 / k) AS ess_fraction,
       avg(one_sample) AS mean_reward, avg(best_of_n) AS bon_reward
FROM per_prompt
"""

# Prompts with the sample indices in [0, k) that no registered candidate of the round holds.
MISSING_SAMPLES = """
SELECT p.prompt_id, p.prompt, p.messages, list(i.i ORDER BY i.i) AS missing
FROM prompts p CROSS JOIN range($k) i(i)
ANTI JOIN (SELECT prompt_id, sample_index FROM candidates WHERE round = $round) c
    ON c.prompt_id = p.prompt_id AND c.sample_index = i.i
GROUP BY p.prompt_id, p.prompt, p.messages
ORDER BY p.prompt_id
"""

def _literal(text: str) -> str:
    """A SQL string literal's body (our own paths; quotes doubled)."""
    return text.replace("'", "''")


def reader_script(root: Path) -> str:
    """The DuckDB statements that open a store for reading: the catalog tables as they are now
    (the first registration of each key), and the views over exactly the registered files."""
    r = _literal(str(root))
    lines = [
        "-- BOND store: read-only views over its registered files (written by bond; do not edit).",
        f"-- DuckDB CLI (pip install duckdb-cli):  duckdb -init '{r}/store.sql'",
        f"-- Python:  con = duckdb.connect(); con.execute(open('{r}/store.sql').read())",
        "-- A snapshot of the catalog when it runs: run it again (.read in the CLI) to see newer shards.",
        "SET parquet_metadata_cache = true;",
    ]
    for table, (key, _) in catalog.TABLES.items():
        folder = f"{r}/{catalog.CATALOG_DIR}/{table}"
        # the newest base, the segments after it, the batches after the newest segment (names sort by time)
        lines.append(f"SET VARIABLE bond_{table}_base = (SELECT max(file) FROM glob('{folder}/*-base.parquet'));")
        lines.append(f"SET VARIABLE bond_{table}_segment = (SELECT coalesce(max(file), getvariable('bond_{table}_base')) "
                     f"FROM glob('{folder}/*-segment.parquet') WHERE file > getvariable('bond_{table}_base'));")
        lines.append(f"SET VARIABLE bond_{table}_files = (SELECT list(file) FROM glob('{folder}/*.parquet') "
                     f"WHERE file = getvariable('bond_{table}_base') OR (file > getvariable('bond_{table}_base') AND "
                     f"(file LIKE '%-segment.parquet' OR file > getvariable('bond_{table}_segment'))));")
        lines.append(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT *{CATALOG_COLUMNS.get(table, '')} "
                     f"FROM read_parquet(getvariable('bond_{table}_files')) "
                     f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY registered_at) = 1;")
    for view in VIEWS:
        lines.append(f"SET VARIABLE bond_{view} = (SELECT coalesce(list(DISTINCT '{r}/' || path), []) "
                     f"FROM shards WHERE kind = '{view}');")
        lines.append(f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT * FROM read_parquet(list_concat("
                     f"['{r}/{catalog.CATALOG_DIR}/empty/{view}.parquet'], getvariable('bond_{view}')), "
                     "hive_partitioning = false);")
    if (root / catalog.CATALOG_DIR / "empty" / "dataset_rows.parquet").is_file():  # stores written by this version
        lines.append(DATASET_ROWS_VIEW.strip().format(r=r, catalog=catalog.CATALOG_DIR))
    return "\n".join(lines) + "\n" + POOL_VIEW.strip() + "\n"


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
    """A store folder: Parquet shards and their catalog. Reads never lock; writes hold the lease."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    @property
    def catalog_dir(self) -> Path:
        return self.root / catalog.CATALOG_DIR

    def exists(self) -> bool:
        """A catalog is there (the writer lease alone creates `_catalog/` but no table)."""
        return catalog.table_dir(self.root, "shards").is_dir()

    # ---- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, command: str) -> Iterator[Store]:
        """Hold the store's writer lease (creating the store if needed); a second writer fails at
        once with a message naming this one. Re-entrant within a process."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} is a file, not a store folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.root}: cannot create the store folder ({e.strerror})") from None
        outermost = not catalog.holds_lease(self.root)
        with catalog.writer_lease(self.root, command):
            if outermost:
                self._prepare()
            yield self

    def _prepare(self) -> None:
        """Create the catalog (migrating an older DuckDB catalog once) and keep `store.sql` naming
        this folder, wherever the store has been moved to."""
        legacy, fresh = self.root / "catalog.duckdb", not self.exists()
        catalog.ensure_layout(self.root, EMPTY_FILES)
        if fresh and legacy.is_file():
            _migrate(legacy, self.root)
        script, path = reader_script(self.root), self.root / "store.sql"
        if not path.is_file() or path.read_text() != script:
            write_text_atomic(script, path)

    def register_shards(self, manifests: list[dict]) -> None:
        """Register finished shards: one manifest file appended to the catalog."""
        if not manifests:
            return
        for m in manifests:
            path = self.root / m["path"]
            if not path.is_file() or ".." in Path(m["path"]).parts:
                raise StoreError(f"shard {m['shard_id']}: file {path} is missing or outside the store")
        rows = [{"shard_id": m["shard_id"], "kind": m["kind"], "round": m.get("round"), "rm_id": m.get("rm_id"),
                 "path": m["path"], "num_rows": m["num_rows"], "sha256": m["sha256"], "manifest": json.dumps(m)}
                for m in manifests]
        with self.writing("register shards"):
            catalog.append(self.root, "shards", rows)

    def remove_orphans(self, subdir: str) -> list[Path]:
        """Delete Parquet files under `subdir` that the catalog does not list (and temp files)."""
        folder = self.root / subdir
        with self.writing("remove orphans"):
            if not folder.exists():
                return []
            known = set(self.query("SELECT path FROM shards").column("path").to_pylist())
            removed = []
            for path in folder.rglob("*"):
                rel = path.relative_to(self.root).as_posix()
                if path.is_file() and (is_temporary(path) or (path.suffix == ".parquet" and rel not in known)):
                    path.unlink()
                    removed.append(path)
            return removed

    def register_anchor(self, round_: int, anchor_path: str, anchor_hash: str,
                        parent_round: int | None = None, config: dict | None = None) -> None:
        """Register the anchor (generator) of a round; idempotent for the same hash."""
        with self.writing(f"register the anchor of round {round_}"):
            row = self.anchor(round_)
            if row and row["anchor_hash"] != anchor_hash:
                raise StoreError(
                    f"round {round_} already has anchor {row['anchor_hash']}; refusing to replace it with {anchor_hash}")
            if not row:
                catalog.append(self.root, "rounds", [{
                    "round": round_, "anchor_path": anchor_path, "anchor_hash": anchor_hash,
                    "parent_round": parent_round, "config": json.dumps(config or {})}])

    def check_reward_model(self, rm_id: str, rm_hash: str, spec: str) -> bool:
        """Whether the id is registered (with this hash); a changed reward model under a registered
        id is refused. Registers nothing."""
        rows = self.query("SELECT rm_hash, spec FROM reward_models WHERE rm_id = ?", [rm_id]).to_pylist()
        if rows and rows[0]["rm_hash"] != rm_hash:
            raise StoreError(
                f"reward model id {rm_id!r} is registered with hash {rows[0]['rm_hash']} ({rows[0]['spec']}); "
                f"{spec} hashes to {rm_hash}. Give the changed reward model a new --rm-id.")
        return bool(rows)

    def register_reward_model(self, rm_id: str, rm_hash: str, spec: str) -> None:
        with self.writing(f"register reward model {rm_id}"):
            if not self.check_reward_model(rm_id, rm_hash, spec):
                catalog.append(self.root, "reward_models", [{"rm_id": rm_id, "rm_hash": rm_hash, "spec": spec}])

    def register_dataset(self, record: dict) -> None:
        with self.writing(f"register dataset {record['dataset_id']}"):
            if not self.query("SELECT 1 FROM datasets WHERE dataset_id = ?", [record["dataset_id"]]).num_rows:
                catalog.append(self.root, "datasets", [{
                    k: record[k] for k in ("dataset_id", "round", "rm_id", "n", "path", "num_rows", "num_prompts")
                } | {"card": json.dumps(record["card"])}])

    # ---- reading -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """An in-memory DuckDB connection with the store's tables and views (a snapshot)."""
        if not self.exists():
            if (self.root / "catalog.duckdb").is_file():
                raise StoreError(f"{self.root} has a catalog of an older version: run `bond migrate --store "
                                 f"{self.root}` once")
            raise StoreError(f"no catalog at {self.catalog_dir}: is {self.root} a BOND store?")
        con = duckdb.connect(":memory:")
        try:
            try:
                con.execute(reader_script(self.root))
            except duckdb.IOException:
                raise  # a compaction deleted a file between glob and read: Store.query retries
            except duckdb.Error as e:
                raise StoreError(f"cannot open the catalog of {self.root}: {_one_line(e)}") from None
            yield con
        finally:
            con.close()

    def query(self, sql: str, params: dict | list | None = None) -> pa.Table:
        """Run one of *our* queries on a fresh snapshot and return an Arrow table. Retried once: a
        catalog compaction may delete a replaced manifest between DuckDB's glob and its read."""
        for attempt in (0, 1):
            try:
                with self.reader() as con:
                    return con.sql(sql, params=params or []).to_arrow_table()
            except duckdb.IOException:
                if attempt:
                    raise

    def registered_shards(self, kind: str, round_: int | None = None, rm_id: str | None = None) -> list[dict]:
        rows = self.query(
            "SELECT manifest FROM shards WHERE kind = $kind "
            "AND ($round IS NULL OR round = $round) AND ($rm IS NULL OR rm_id = $rm) ORDER BY path",
            {"kind": kind, "round": round_, "rm": rm_id},
        ).column("manifest").to_pylist()
        return [json.loads(r) for r in rows]

    def missing_samples(self, round_: int, k: int, batch_rows: int = 4096) -> Iterator[dict]:
        """Prompts (id, text, messages) with their sample indices in [0, k) not yet registered for the
        round, in prompt_id order, streamed in record batches: no column of the store is loaded whole."""
        with self.reader() as con:
            reader = con.sql(MISSING_SAMPLES, params={"k": k, "round": round_}).to_arrow_reader(batch_rows)
            for batch in reader:
                yield from batch.to_pylist()

    def new_prompt_mask(self, prompt_ids: pa.Array) -> list[bool]:
        """For each id, whether the store has no such prompt yet (an anti-join, not a Python set)."""
        if not self.exists():
            return [True] * len(prompt_ids)
        with self.reader() as con:
            con.register("incoming", pa.table({"i": pa.array(range(len(prompt_ids))), "prompt_id": prompt_ids}))
            new = set(con.sql("SELECT i FROM incoming ANTI JOIN prompts USING (prompt_id)").to_arrow_table()
                      .column("i").to_pylist())
        return [i in new for i in range(len(prompt_ids))]

    def missing_scores(self, round_: int, rm_id: str) -> dict:
        """Candidates shards of a round without a scores shard of this reward model: counts."""
        rows = self.query(
            "SELECT count(*) AS shards, coalesce(sum(c.num_rows), 0)::BIGINT AS candidates, "
            "(SELECT count(*) FROM shards WHERE kind = 'candidates' AND round = $round) AS of_shards "
            "FROM shards c WHERE c.kind = 'candidates' AND c.round = $round AND NOT EXISTS ("
            "SELECT 1 FROM shards s WHERE s.kind = 'scores' AND s.round = $round AND s.rm_id = $rm "
            "AND s.shard_id = c.shard_id || '-' || $rm)", {"round": round_, "rm": rm_id}).to_pylist()
        return rows[0]

    def write_dataset(self, round_: int, rm_id: str, n: int, out: Path, weighting: str = "unbiased",
                      target: str = "anchor", memory_limit: str = "1GB") -> None:
        """COPY the round's weighted pool (DATASET_ROWS) to a Parquet file, streamed under a memory
        limit (DuckDB spills to a temporary folder beside `out`)."""
        with self.reader() as con:
            con.execute("SET memory_limit = ?", [memory_limit])
            con.execute("SET temp_directory = ?", [str(out.parent / ".duckdb-tmp")])
            con.execute("SET preserve_insertion_order = true")
            for name, value in (("bond_round", round_), ("bond_rm_id", rm_id), ("bond_n", n),
                                ("bond_weighting", weighting), ("bond_target", target)):
                con.execute(f"SET VARIABLE {name} = ?", [value])
            con.execute(f"COPY ({DATASET_ROWS}) TO '{_literal(str(out))}' (FORMAT parquet, COMPRESSION zstd)")

    def pool_sizes(self, round_: int, rm_id: str) -> dict:
        return self.query(POOL_SIZES, {"round": round_, "rm": rm_id}).to_pylist()[0]

    def sampling_settings(self, round_: int) -> list[dict]:
        """The distinct sampling settings (temperature, top_p, max_new_tokens) of a round's candidates."""
        return [json.loads(s) for s in self.query(SAMPLING_SETTINGS, {"round": round_}).column(0).to_pylist()]

    def round_lineage(self, round_: int) -> dict:
        """How a round's candidates were drawn (a dataset card's provenance): the distinct sampling
        settings and generator backends."""
        return {"sampling": self.sampling_settings(round_),
                "backends": self.query(BACKENDS, {"round": round_}).column(0).to_pylist()}

    def dataset_summary(self, path: Path) -> dict:
        rows = self.query(DATASET_SUMMARY, {"path": str(path)}).to_pylist()[0]
        return {k: (int(v) if k in ("prompts", "candidates", "k_min", "k_max") else float(v)) for k, v in rows.items()}

    def status(self) -> dict:
        """The store at a glance (`bond status`): rounds and anchors; per round the candidates (and
        k range), scores per reward model, datasets and whether the next anchor is registered; and
        the stage `bond rounds` would run next. From the catalog, plus one scan of the candidates'
        (round, prompt_id) columns for the k range."""
        with self.reader() as con:
            def rows(sql: str) -> list[dict]:
                return con.sql(sql).to_arrow_table().to_pylist()

            rounds = rows("SELECT round, anchor_hash, parent_round, anchor_path FROM rounds ORDER BY round")
            prompts = rows("SELECT coalesce(sum(num_rows), 0)::BIGINT AS n FROM shards WHERE kind = 'prompts'")[0]["n"]
            cands = {r["round"]: r for r in rows(
                "SELECT round, count(*) AS shards, sum(num_rows)::BIGINT AS candidates FROM shards "
                "WHERE kind = 'candidates' GROUP BY round")}
            ks = {r["round"]: r for r in rows(
                "SELECT round, min(k) AS k_min, max(k) AS k_max, count(*) AS prompts FROM "
                "(SELECT round, prompt_id, count(*) AS k FROM candidates GROUP BY ALL) GROUP BY round")}
            scores = rows("SELECT round, rm_id, count(*) AS shards, sum(num_rows)::BIGINT AS scored FROM shards "
                          "WHERE kind = 'scores' GROUP BY ALL ORDER BY round, rm_id")
            datasets = rows("SELECT round, dataset_id, n, num_rows, card FROM datasets ORDER BY round, registered_at")
        anchors = {r["round"] for r in rounds}
        per_round = []
        for t in sorted(anchors | set(cands)):
            c = cands.get(t, {"shards": 0, "candidates": 0})
            scored = [{k: v for k, v in s.items() if k != "round"} for s in scores if s["round"] == t]
            built = [{"dataset_id": d["dataset_id"], "n": d["n"], "rows": d["num_rows"],
                      **{k: json.loads(d["card"]).get(k) for k in ("weighting", "ess_mean", "mean_reward", "bon_reward")}}
                     for d in datasets if d["round"] == t]
            per_round.append({"round": t, "anchor": t in anchors, "candidate_shards": c["shards"],
                              "candidates": c["candidates"], **{k: ks.get(t, {}).get(k) for k in ("prompts", "k_min", "k_max")},
                              "scores": scored, "datasets": built, "trained": t + 1 in anchors})
        return {"store": str(self.root), "prompts": prompts, "rounds": rounds, "per_round": per_round,
                "next": _next_stage(per_round)}

    def anchor(self, round_: int) -> dict | None:
        if not self.exists():
            return None
        rows = self.query("SELECT round, anchor_path, anchor_hash FROM rounds WHERE round = ?", [round_]).to_pylist()
        return rows[0] if rows else None

    def report_facts(self) -> dict:
        """What the round reports read, from one snapshot: anchors by round (registration config
        parsed: a trained one names its dataset), datasets by id, per round the candidates' count,
        tokens and finish reasons (`stop`: end of sequence, `length`: cut at max_new_tokens), and
        per (round, reward model) the rewards' count, mean, std (population), min and max."""
        with self.reader() as con:
            def rows(sql: str) -> list[dict]:
                return con.sql(sql).to_arrow_table().to_pylist()

            anchors = rows("SELECT round, anchor_path, anchor_hash, parent_round, config FROM rounds ORDER BY round")
            datasets = rows("SELECT * FROM datasets ORDER BY round, dataset_id")
            generation = rows(
                "SELECT round, count(*)::BIGINT AS candidates, coalesce(sum(num_tokens), 0)::BIGINT AS tokens, "
                "count(*) FILTER (WHERE finish_reason = 'stop')::BIGINT AS stop, "
                "count(*) FILTER (WHERE finish_reason = 'length')::BIGINT AS length FROM candidates GROUP BY round")
            rewards = rows(
                "SELECT round, rm_id, count(*)::BIGINT AS count, avg(reward) AS mean, stddev_pop(reward) AS std, "
                "min(reward) AS min, max(reward) AS max FROM scores GROUP BY round, rm_id ORDER BY round, rm_id")
        return {"anchors": {a["round"]: {**a, "config": json.loads(a["config"] or "{}")} for a in anchors},
                "datasets": {d["dataset_id"]: d for d in datasets},
                "generation": {g["round"]: g for g in generation}, "rewards": rewards}

    def reward_model_ids(self, round_: int) -> list[str]:
        rows = self.query("SELECT DISTINCT rm_id FROM shards WHERE kind = 'scores' AND round = ? ORDER BY 1", [round_])
        return rows.column("rm_id").to_pylist()

    def pool_summary(self, round_: int) -> dict:
        """A round's candidates (the generate stage's summary): shards, prompts, rows, completion
        tokens and how completions ended (`stop`: EOS, `length`: the max_new_tokens cap)."""
        shards = self.query("SELECT count(*) AS n FROM shards WHERE kind = 'candidates' AND round = ?", [round_])
        row = self.query(
            "SELECT count(DISTINCT prompt_id) AS prompts, count(*) AS candidates, "
            "coalesce(sum(num_tokens), 0)::BIGINT AS tokens, count(*) FILTER (finish_reason = 'stop') AS stop, "
            "count(*) FILTER (finish_reason = 'length') AS length FROM candidates WHERE round = ?", [round_])
        return {"round": round_, "shards": shards.column("n")[0].as_py(), **row.to_pylist()[0]}

    def score_summary(self, round_: int, rm_id: str) -> dict:
        """One reward model's scores of a round (the score stage's summary): rows, reward mean,
        standard deviation (population) and range."""
        row = self.query(
            "SELECT count(*) AS scored, avg(reward) AS mean, coalesce(stddev_pop(reward), 0) AS std, "
            "min(reward) AS min, max(reward) AS max FROM scores WHERE round = ? AND rm_id = ?", [round_, rm_id])
        return {"round": round_, "rm_id": rm_id, **row.to_pylist()[0]}


def _next_stage(per_round: list[dict]) -> str:
    """What `bond rounds` would do next: the first round with an anchor and no successor."""
    for r in per_round:
        if not r["anchor"] or r["trained"]:
            continue
        t = r["round"]
        if not r["candidates"]:
            return f"generate round {t}"
        if not r["scores"] or any(s["shards"] < r["candidate_shards"] for s in r["scores"]):
            return f"score round {t}"
        if not r["datasets"]:
            return f"build round {t}"
        return f"train round {t}"
    return "register an anchor: `bond init --store DIR --anchor MODEL`" if not per_round else "nothing: every round is trained"


def _migrate(legacy: Path, root: Path) -> None:
    """Copy the tables of a DuckDB catalog of an earlier version into the registry (once)."""
    con = duckdb.connect(str(legacy), read_only=True)
    try:
        for table, (_, sch) in catalog.TABLES.items():
            rows = con.sql(f"SELECT * FROM {table}").to_arrow_table().to_pylist()
            for r in rows:
                for k in ("manifest", "config", "card"):
                    if k in r and not isinstance(r[k], str | None):
                        r[k] = json.dumps(r[k])
            if rows:
                catalog.append(root, table, rows)
    finally:
        con.close()


class QueryInterrupted(StoreError):
    """The analyst's query was stopped by Ctrl-C."""


class QueryTimeout(StoreError):
    """The analyst's query ran past its --timeout."""


_EXPLAIN = re.compile(r"^\s*EXPLAIN\b\s*(?:\([^()]*\)\s*)?(?:ANALY[SZ]E\b\s*)?(?P<inner>.*)$", re.IGNORECASE | re.DOTALL)


def check_read_only(sql: str) -> list:
    """The statements of an analyst's SQL if every one is a SELECT (DESCRIBE, SHOW, SUMMARIZE and
    FROM-first queries are SELECTs to DuckDB) or an EXPLAIN [ANALYZE] of exactly one SELECT;
    StoreError otherwise. EXPLAIN ANALYZE runs the statement it explains, so its inner statement
    is checked too; what cannot be parsed that way is refused (fail closed)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise StoreError(f"SQL does not parse: {_one_line(e)}") from None
    if not statements:
        raise StoreError("no SQL statement given")
    for st in statements:
        kind = st.type.name
        if st.type == duckdb.StatementType.EXPLAIN:
            match = _EXPLAIN.match(st.query)
            try:
                inner = duckdb.extract_statements(match.group("inner")) if match else []
            except duckdb.Error:
                inner = []
            if len(inner) == 1 and inner[0].type == duckdb.StatementType.SELECT:
                continue
            kind = "EXPLAIN of a statement that is not a SELECT"
        elif st.type == duckdb.StatementType.SELECT:
            continue
        raise StoreError(f"bond sql is read-only: refusing a {kind} ({st.query.strip()[:60]!r}); "
                         "only SELECT, DESCRIBE/SHOW and EXPLAIN [ANALYZE] of a SELECT are allowed")
    return statements


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def read_only_query(store: Store, sql: str, timeout: float | None = None) -> pa.Table:
    """Run an analyst's SQL: only reading statements (`check_read_only`), on an in-memory snapshot
    that can read no file outside the store. Ctrl-C (QueryInterrupted) or `timeout` seconds
    (QueryTimeout) stop it within a moment, through DuckDB's own interrupt.

    Why the signal mask: a Python SIGINT handler runs only once DuckDB returns, and when one of
    DuckDB's (or pyarrow's) threads took the signal the query ran on. So, called from the main
    thread, SIGINT is blocked (threads started later inherit the mask: `bond sql` blocks it before
    pyarrow or DuckDB start any), and a watcher thread takes it with sigtimedwait and interrupts
    the query. A process that started such threads earlier may still see a late Ctrl-C."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        was_blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    stopped: dict = {}
    try:
        statements = check_read_only(sql)
        with store.reader() as con:
            con.execute("SET allowed_directories = [?]", [str(store.root) + os.sep])
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            with _watch(con, timeout, main, stopped):
                result = None
                for st in statements:
                    result = con.sql(st.query).to_arrow_table()
                return result
    except StoreError:
        raise
    except (duckdb.Error, RuntimeError) as e:
        if stopped.get("by") == "timeout":
            raise QueryTimeout(f"query stopped after --timeout {timeout:g} s") from None
        if stopped.get("by") == "ctrl-c" or "interrupted" in str(e).lower():
            raise QueryInterrupted("query interrupted (Ctrl-C)") from None
        raise StoreError(f"SQL error: {_one_line(e)}") from None
    finally:
        if main and not was_blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def _watch(con: duckdb.DuckDBPyConnection, timeout: float | None, take_sigint: bool, stopped: dict) -> Iterator[None]:
    """A thread that interrupts `con` on a (blocked) SIGINT or once `timeout` seconds pass; it
    records which in `stopped["by"]`."""
    done = threading.Event()
    deadline = None if timeout is None else time.monotonic() + timeout

    def watch() -> None:
        while not done.is_set():
            if take_sigint and signal.sigtimedwait({signal.SIGINT}, 0.05) is not None:
                stopped["by"] = "ctrl-c"
            elif not take_sigint:
                done.wait(0.05)
            if deadline is not None and time.monotonic() > deadline:
                stopped["by"] = "timeout"
            if "by" in stopped:  # again and again: an interrupt that lands before the query starts is lost
                while not done.is_set():
                    con.interrupt()
                    done.wait(0.05)
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
