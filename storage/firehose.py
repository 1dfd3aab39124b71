"""Firehose-side writes: a reduced `Batch` (records, repo rows, cursor, coverage) in one transaction.

Durability rule: `apply(batch)` commits the batch's effects AND its cursor in one
transaction, so after a crash the stored cursor never points past an effect that is lost.
Bulk rows go in as Arrow tables (`INSERT ... SELECT FROM arrow`), never `executemany`.
Also the start-up reads of what the firehose owns: the cursor, coverage spans, repo rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa

from . import repos
from .base import now_utc
from .batch import Batch, RepoRow
from .compaction import Compacting
from .lake import next_value
from .queries import COUNT_DESYNCHRONIZED_SQL
from .records import append_deletes, append_purges, append_puts, next_version
from .states import CoverageEnd

__all__ = ["FirehoseWrites", "RECORD_SCHEMA", "KEY_SCHEMA", "DELETE_SCHEMA", "REPO_SCHEMA", "REPO_FIELDS", "record_columns"]

_TS = pa.timestamp("us", tz="UTC")

RECORD_SCHEMA = pa.schema(
    [
        ("did", pa.string()),
        ("collection", pa.string()),
        ("rkey", pa.string()),
        ("cid", pa.string()),
        ("rev", pa.string()),
        ("record", pa.string()),
        ("created_at", pa.string()),
        ("event_at", pa.string()),
    ]
)
KEY_SCHEMA = pa.schema([("did", pa.string()), ("collection", pa.string()), ("rkey", pa.string())])
# a deletion: the key and the rev of the commit that removed it (None: unknown, see storage/records.py)
DELETE_SCHEMA = KEY_SCHEMA.append(pa.field("rev", pa.string()))
REPO_SCHEMA = pa.schema(
    [
        ("did", pa.string()),
        ("rev", pa.string()),
        ("data_cid", pa.string()),
        ("commit_cid", pa.string()),
        ("last_seq", pa.int64()),
        ("last_event_at", pa.string()),
        ("handle", pa.string()),
        ("active", pa.bool_()),
        ("status", pa.string()),
        ("sync_state", pa.string()),
        ("desync_reason", pa.string()),
        ("desynced_at", _TS),
        ("first_seen_at", _TS),
    ]
)
REPO_FIELDS = [f.name for f in REPO_SCHEMA]
def record_columns(batch: Batch) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Split a reduced batch into upsert columns and delete-key columns."""
    # Column-wise comprehensions, not one append per cell: this runs in the writer thread and
    # holds the GIL that the event loop's parser needs.
    records = batch.records
    put_rows = [put for put in records.values() if put is not None]
    if len(put_rows) == len(records):  # the common case: no deletes
        put_keys, del_keys = list(records), []
    else:
        put_keys = [key for key, put in records.items() if put is not None]
        del_keys = [key for key, put in records.items() if put is None]
    puts: dict[str, list[Any]] = dict(zip(("did", "collection", "rkey"), _transpose(put_keys), strict=True))
    puts["cid"] = [p.cid for p in put_rows]
    puts["rev"] = [p.rev for p in put_rows]
    puts["record"] = [p.record for p in put_rows]
    puts["created_at"] = [p.created_at for p in put_rows]
    puts["event_at"] = [p.event_at for p in put_rows]
    dels: dict[str, list[Any]] = dict(zip(("did", "collection", "rkey"), _transpose(del_keys), strict=True))
    revs = batch.delete_revs
    dels["rev"] = [revs.get(key) for key in del_keys]
    return puts, dels


def _transpose(keys: list[tuple[str, str, str]]) -> tuple[list[str], list[str], list[str]]:
    if not keys:
        return [], [], []
    did, collection, rkey = zip(*keys, strict=True)
    return list(did), list(collection), list(rkey)


def arrow_table(columns: Mapping[str, list[Any]], schema: pa.Schema) -> pa.Table:
    """Columns -> Arrow on the system allocator. pyarrow's default (jemalloc) pool kept freed
    batch buffers resident: the firehose consumer peaked ~28 MB higher at the same speed."""
    pool = pa.system_memory_pool()
    return pa.Table.from_arrays([pa.array(columns[f.name], type=f.type, memory_pool=pool) for f in schema],
                                schema=schema)


def ts_sql(col: str) -> str:
    # Event times and createdAt arrive as ISO strings; DuckDB parses them vectorised.
    return f"TRY_CAST({col} AS TIMESTAMPTZ)"


class FirehoseWrites(Compacting):
    """Store methods for the firehose consumer and the Kafka sink (`apply`) and their start-up reads."""

    def apply(self, batch: Batch) -> None:
        """Commit a batch's effects and its cursor atomically."""
        if batch.is_empty() and batch.coverage is None:
            return
        now = now_utc()
        puts_cols, del_cols = record_columns(batch)
        self._txn(lambda con: self._apply_in(con, batch, now, puts_cols, del_cols))
        self._note_appended(len(batch.records) + len(batch.purged_dids) + len(batch.repos))

    def _apply_in(
        self,
        con: duckdb.DuckDBPyConnection,
        batch: Batch,
        now: datetime,
        puts_cols: dict[str, list[Any]],
        del_cols: dict[str, list[Any]],
    ) -> None:
        v = next_version(con)
        if batch.purged_dids:
            append_purges(con, v, sorted(batch.purged_dids))
        if del_cols["did"]:
            append_deletes(con, v, arrow_table(del_cols, DELETE_SCHEMA), now)
        if puts_cols["did"]:
            append_puts(con, v, arrow_table(puts_cols, RECORD_SCHEMA), now)
        if batch.repos:
            self._upsert_repos(con, batch.repos.values())
        if batch.cursor is not None:
            source, seq = batch.cursor
            if self.lake:
                # no primary key on the lake, and a DELETE conflicts with every other writer's insert
                # into the table: appended, the newest row of a source wins (load_cursor, status)
                con.execute("INSERT INTO cursors VALUES (?, ?, ?)", [source, seq, now])
            else:
                con.execute(
                    "INSERT INTO cursors VALUES (?, ?, ?) ON CONFLICT (source) DO UPDATE "
                    "SET seq = excluded.seq, updated_at = excluded.updated_at",
                    [source, seq, now],
                )
        if batch.coverage is not None:
            c = batch.coverage
            con.execute(
                "UPDATE coverage SET first_seq = coalesce(first_seq, ?), last_seq = ?, "
                f"first_event_at = coalesce(first_event_at, {ts_sql('?::VARCHAR')}), "
                f"last_event_at = coalesce({ts_sql('?::VARCHAR')}, last_event_at) WHERE id = ?",
                [c.first_seq, c.last_seq, c.first_event_at, c.last_event_at, c.id],
            )

    def _upsert_repos(self, con: duckdb.DuckDBPyConnection, rows: Iterable[RepoRow]) -> None:
        """Append each row's head group to repo_log (first_seen_at is write-once: the view keeps
        the first value ever stored, so a row's own counts only for a new DID)."""
        now = now_utc()
        cols: dict[str, list[Any]] = {name: [] for name in REPO_FIELDS}
        for row in rows:
            for name in REPO_FIELDS:
                cols[name].append(getattr(row, name))
        cols["first_seen_at"] = [v or now for v in cols["first_seen_at"]]
        repos.append_head(con, self._version(con), arrow_table(cols, REPO_SCHEMA))

    # -- cursor, coverage, per-DID state at start-up ---------------------------------------

    def load_cursor(self, source: str) -> int | None:
        rows = self.fetchall("SELECT seq FROM cursors WHERE source = ? ORDER BY updated_at DESC LIMIT 1", [source])
        return rows[0][0] if rows else None

    def start_coverage(self, source: str) -> int:
        """Open a coverage span for a new consumer run; spans left 'running' by a crash are closed."""

        def body(con: duckdb.DuckDBPyConnection) -> int:
            con.execute(
                "UPDATE coverage SET ended = ?, stopped_at = coalesce(last_event_at, started_at) "
                "WHERE source = ? AND ended = ?",
                [CoverageEnd.CRASHED.value, source, CoverageEnd.RUNNING.value],
            )
            span = next_value(con, "coverage_id")[0]  # the lake has no sequences: taken first (storage/lake.py)
            con.execute("INSERT INTO coverage (id, source, started_at) VALUES (?, ?, ?)", [span, source, now_utc()])
            return span

        return int(self._txn(body))

    def end_coverage(self, span_id: int, ended: CoverageEnd) -> None:
        self._txn(
            lambda con: con.execute(
                "UPDATE coverage SET ended = ?, stopped_at = ? WHERE id = ?", [ended.value, now_utc(), span_id]
            )
        )

    def load_repos(self) -> dict[str, RepoRow]:
        """Every DID's firehose-owned state (a full scan; the daemon reads rows as needed: `repo_row`)."""
        table = self.fetchall(
            "SELECT did, rev, data_cid, commit_cid, last_seq, CAST(last_event_at AS VARCHAR), "
            "handle, active, status, sync_state, desync_reason, desynced_at, first_seen_at FROM repos"
        )
        return {row[0]: RepoRow(*row) for row in table}

    def count_desynchronized(self) -> int:
        """How many DIDs have a broken chain, read on its own cursor outside the write lock."""
        with self.read() as reader:
            return int(reader.fetchall(COUNT_DESYNCHRONIZED_SQL)[0][0])
