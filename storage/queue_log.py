"""The backfill queue's tables: an append-only log of transitions over a compacted base.

Layout (no primary key, no UPDATE: at 10^7 queued DIDs DuckDB re-wrote the indexed table at
each claim's COMMIT, see bench/queue_claims.py):
    queue_base      one row per DID, as of the last compaction
    queue_log       appended rows `(v, <every column>)`: each is a whole transition of one DID
                    (enqueue, claim, done, failed, deferred, recover), `v` its transaction's
                    write version
    backfill_queue  the view: the newest row per DID (the log's highest v, else the base row)

A transaction appends at most one row per DID, so "newest" is unambiguous. `host` is the DID's
PDS host when it was known at enqueue (the scheduler groups and paces by it; NULL = resolve
first). `compact(con, upto_v)` folds log rows with v <= upto_v into the base on its own cursor,
like repos.py; `load_pending` reads one chunk of due pending DIDs, hosts interleaved: the store pops
claims from memory and reads the table once per chunk, never per claim.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import duckdb
import pyarrow as pa

from .lake import run_ddl

__all__ = ["QUEUE_COLUMNS", "QUEUE_DDL", "create_queue", "append", "current", "load_pending", "in_state", "compact"]

QUEUE_COLUMNS: Final = ("did", "reasons", "enqueued_at", "state", "retry_after", "error", "updated_at", "host")
_TYPES: Final = {
    "did": pa.string(), "reasons": pa.list_(pa.string()), "enqueued_at": pa.timestamp("us", tz="UTC"),
    "state": pa.string(), "retry_after": pa.timestamp("us", tz="UTC"), "error": pa.string(),
    "updated_at": pa.timestamp("us", tz="UTC"), "host": pa.string(),
}
_COLS: Final = ", ".join(QUEUE_COLUMNS)

QUEUE_DDL: Final = f"""
CREATE SEQUENCE IF NOT EXISTS write_version;
-- one row per DID: the queue as of the last compaction (storage/queue_log.py)
CREATE TABLE IF NOT EXISTS queue_base (
    did          VARCHAR NOT NULL,
    reasons      VARCHAR[] NOT NULL,
    enqueued_at  TIMESTAMPTZ NOT NULL,
    state        VARCHAR NOT NULL,          -- QueueState
    retry_after  TIMESTAMPTZ,
    error        VARCHAR,
    updated_at   TIMESTAMPTZ NOT NULL,
    host         VARCHAR                    -- the PDS host known at enqueue, NULL = unknown
);
-- one row per transition, appended; the newest per DID wins
CREATE TABLE IF NOT EXISTS queue_log (
    v            BIGINT NOT NULL,
    did          VARCHAR NOT NULL,
    reasons      VARCHAR[] NOT NULL,
    enqueued_at  TIMESTAMPTZ NOT NULL,
    state        VARCHAR NOT NULL,
    retry_after  TIMESTAMPTZ,
    error        VARCHAR,
    updated_at   TIMESTAMPTZ NOT NULL,
    host         VARCHAR
);
CREATE OR REPLACE VIEW backfill_queue AS
SELECT {_COLS} FROM queue_base WHERE did NOT IN (SELECT did FROM queue_log)
UNION ALL
SELECT {_COLS} FROM (
    SELECT *, row_number() OVER (PARTITION BY did ORDER BY v DESC) AS _n FROM queue_log
) WHERE _n = 1;
"""


def _is_old_table(con: duckdb.DuckDBPyConnection) -> bool:
    rows = con.execute(
        "SELECT 1 FROM duckdb_tables() WHERE database_name = current_database() AND schema_name = 'main' "
        "AND table_name = 'backfill_queue'"
    ).fetchall()
    return bool(rows)


def create_queue(con: duckdb.DuckDBPyConnection) -> int:
    """The tables and the view, in the caller's transaction; an older file's `backfill_queue`
    table (a VARCHAR PRIMARY KEY, updated in place) is moved into queue_base. Returns rows moved."""
    moved = 0
    if _is_old_table(con):
        con.execute("ALTER TABLE backfill_queue RENAME TO backfill_queue_v1")
        run_ddl(con, QUEUE_DDL)
        con.execute(f"INSERT INTO queue_base ({_COLS}) SELECT did, reasons, enqueued_at, state, retry_after, "
                    "error, updated_at, NULL FROM backfill_queue_v1 ORDER BY did")
        moved = int(con.execute("SELECT count(*) FROM queue_base").fetchall()[0][0])
        con.execute("DROP TABLE backfill_queue_v1")
    else:
        run_ddl(con, QUEUE_DDL)
    return moved


def append(con: duckdb.DuckDBPyConnection, v: int, rows: Sequence[dict[str, Any]]) -> int:
    """Append whole rows (one per DID) at write version `v`. Returns the rows appended."""
    if not rows:
        return 0
    table = pa.table({c: [r.get(c) for r in rows] for c in QUEUE_COLUMNS},
                     schema=pa.schema([(c, _TYPES[c]) for c in QUEUE_COLUMNS]))
    con.register("_queue_rows", table)
    try:
        con.execute(f"INSERT INTO queue_log (v, {_COLS}) SELECT ?, {_COLS} FROM _queue_rows", [v])
    finally:
        con.unregister("_queue_rows")
    return len(rows)


def current(con: duckdb.DuckDBPyConnection, dids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The current row of each of `dids` that has one (a point read per DID: zone maps on the
    did-sorted base, a filter on the small log)."""
    out: dict[str, dict[str, Any]] = {}
    if not dids:
        return out
    if len(dids) <= 32:
        # the log first (small; a claimed DID's row is there until a compaction): a base read
        # filters on did with no useful zone map ('did:plc:' fills the 8-byte string stats)
        for did in dids:
            rows = con.execute(f"SELECT {_COLS} FROM queue_log WHERE did = ? ORDER BY v DESC LIMIT 1",
                               [did]).fetchall()
            if not rows:
                rows = con.execute(f"SELECT {_COLS} FROM queue_base WHERE did = ? LIMIT 1", [did]).fetchall()
            if rows:
                out[did] = dict(zip(QUEUE_COLUMNS, rows[0], strict=True))
        return out
    con.register("_queue_keys", pa.table({"did": list(dids)}))
    try:
        rows = con.execute(f"SELECT {_COLS} FROM backfill_queue WHERE did IN (SELECT did FROM _queue_keys)").fetchall()
    finally:
        con.unregister("_queue_keys")
    return {r[0]: dict(zip(QUEUE_COLUMNS, r, strict=True)) for r in rows}


def load_pending(con: duckdb.DuckDBPyConnection, now: datetime, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` whole rows of due pending DIDs, the hosts interleaved (every host's first
    DID, then every host's second, ...) so a chunk feeds many hosts at once.

    No ORDER BY: the scan stops after `limit` matches, so a chunk costs about the same at 10^7
    queued DIDs as at 10^3 (compaction moves rewritten rows to the base's end, so the pending
    ones stay in front)."""
    rows = con.execute(
        f"SELECT {_COLS} FROM backfill_queue WHERE state = 'pending' AND (retry_after IS NULL OR retry_after <= ?) "
        "LIMIT ?", [now, limit]).fetchall()
    by_host: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        row = dict(zip(QUEUE_COLUMNS, r, strict=True))
        by_host.setdefault(row["host"] or "", []).append(row)
    lanes = [iter(v) for _, v in sorted(by_host.items())]
    out: list[dict[str, Any]] = []
    while lanes:
        kept = []
        for lane in lanes:
            row = next(lane, None)
            if row is not None:
                out.append(row)
                kept.append(lane)
        lanes = kept
    return out


def in_state(con: duckdb.DuckDBPyConnection, state: str) -> list[dict[str, Any]]:
    """Every current row in `state` (one pass; for start-up recovery)."""
    rows = con.execute(f"SELECT {_COLS} FROM backfill_queue WHERE state = ?", [state]).fetchall()
    return [dict(zip(QUEUE_COLUMNS, r, strict=True)) for r in rows]


def compact(con: duckdb.DuckDBPyConnection, upto_v: int) -> int:
    """Fold log rows with v <= upto_v into queue_base (caller's transaction, own cursor).
    Returns the DIDs whose base row was rewritten."""
    where = f"v <= {int(upto_v)}"
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _queue_merged AS SELECT {_COLS} FROM ("
        f"  SELECT *, row_number() OVER (PARTITION BY did ORDER BY v DESC) AS _n FROM queue_log WHERE {where}"
        ") WHERE _n = 1")
    try:
        n = int(con.execute("SELECT count(*) FROM _queue_merged").fetchall()[0][0])
        if n:
            con.execute("DELETE FROM queue_base WHERE did IN (SELECT did FROM _queue_merged)")
            con.execute(f"INSERT INTO queue_base ({_COLS}) SELECT {_COLS} FROM _queue_merged ORDER BY did")
            con.execute(f"DELETE FROM queue_log WHERE {where}")
    finally:
        con.execute("DROP TABLE IF EXISTS _queue_merged")
    return n
