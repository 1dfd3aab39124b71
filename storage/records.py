"""The records tables: an append-only version log, a compacted base, and the `records` view.

Why: a table with a primary key re-writes itself and its index at the COMMIT of an upsert
(7-16 s per 5,000 rows at 10M records), so every write here is an APPEND and nothing is UPDATEd.

    record_log     (v, did, collection, rkey, cid, ...)  cid NULL = the key was deleted at v
    record_purges  (v, did)                              every record of did older than v is gone
    record_base    one row per live key as of the last compaction, sorted by (did, collection, rkey)
    records        the view (storage/views.sql): base rows not overridden by the log and not
                   purged, plus the newest log row per key when it is live and not purged since

`v` comes from the `write_version` sequence, one value per reduced batch: a batch holds one
write per key (storage/batch.py). Within a key the newest version is the one with the newest
`rev` (the repo revision, a TID: it only grows), then the highest v; a deletion carries the rev
of the commit that removed the key. Why not v alone: on a lake two processes writing one DID (a
backfill beside the daemon, two backfills, a sink and a worker) take v in one order and may
COMMIT in the other, and a backfill of an older repo rev must not win over a newer commit that
committed first. On one DuckDB file, written one transaction at a time, revs of a key grow with
v, so this is v order. A version without a rev (legacy, or a producer that did not say) takes
the rev of the version of its key before it (`_r` in NEWEST_SQL): it wins over that one by v.
The base row of a key wins over its log versions only when its rev is strictly newer than all
of theirs (on a file, base rows are older than every log row). Worked example, one key, then a compaction
with upto_v = 7:

    log (v=5, put X @r1) (v=7, delete @r2) (v=9, put Y @r3)   -> view shows Y (newest, live)
    compaction takes v <= 7: base row of the key deleted, newest of v<=7 is a delete (nothing
    inserted), log rows v<=7 deleted -> log (v=9, put Y), view still shows Y.
    On a lake (v=11, put Z @r0) committing late -> the view still shows Y: r3 > r0.

Compaction runs on its own cursor and transaction; writers only append, and only compaction
deletes, so the two never touch the same rows and never conflict.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

import duckdb
import pyarrow as pa

from . import refs
from .cids import cid_bytes
from .lake import next_value

__all__ = [
    "next_version",
    "append_puts",
    "append_deletes",
    "append_purges",
    "STORED_CIDS_SQL",
    "NEWEST_SQL",
    "COUNT_STORED_SQL",
    "RecordCompaction",
    "compact_records",
    "migrate_records_v1",
    "migrate_records_text_cids",
    "BASE_COLUMNS",
    "has_created_at_column",
    "migrate_created_offsets",
]

log = logging.getLogger(__name__)

# What a write computes per row beyond what it was given: the event time (the given firehose
# time, else the TID time of the rkey, else of the commit rev). The DIDs a record references go
# to storage/refs.py's table, in the same transaction.
_DERIVED = "coalesce(TRY_CAST(event_at AS TIMESTAMPTZ), tid_time(rkey), tid_time(rev))"
_COLUMNS = "did, collection, rkey, cid, rev, record, created_at, indexed_at, event_at"
# record_base keeps created_at as microseconds after event_at (schema.sql's created_off macros)
BASE_COLUMNS = "did, collection, rkey, cid, rev, record, created_us, created_raw, indexed_at, event_at"
_TO_BASE = ("did, collection, rkey, cid, rev, record, created_off(created_at, event_at), "
            "created_raw(created_at, event_at), indexed_at, event_at")

STORED_CIDS_SQL = "SELECT collection, rkey, cid FROM records WHERE did = ?"

# The newest version of each key among the log rows matching {where}, by (rev, v): `_r` is the
# row's rev, or when it has none the newest rev before it (see the module docstring); `_m` the
# key's newest log rev (no rev: newest of all), which a base row must beat to stay (storage/views.sql).
NEWEST_SQL = """SELECT * FROM (
    SELECT *, coalesce(rev, max(rev) OVER (PARTITION BY did, collection, rkey ORDER BY v
                                           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)) AS _r,
           max(coalesce(rev, chr(1114111))) OVER (PARTITION BY did, collection, rkey) AS _m
    FROM record_log WHERE {where}
) QUALIFY row_number() OVER (PARTITION BY did, collection, rkey ORDER BY _r DESC NULLS LAST, v DESC) = 1"""
COUNT_STORED_SQL = "SELECT count(*) FROM records WHERE did = ?"


def next_version(con: duckdb.DuckDBPyConnection) -> int:
    """A new write version, taken inside the writing transaction."""
    return next_value(con, "write_version")[0]


def append_puts(con: duckdb.DuckDBPyConnection, v: int, table: pa.Table, now: datetime) -> None:
    """Append record versions. `table` has did, collection, rkey, cid, rev, record (JSON text),
    created_at (ISO text) and event_at (ISO text or null) columns. The CIDs are stored binary
    (storage/cids.py), converted here in Python: ~30x cheaper than the SQL macro."""
    cids = pa.array([cid_bytes(c) for c in table.column("cid").to_pylist()], pa.binary())
    table = table.set_column(table.schema.get_field_index("cid"), "cid", cids)
    con.register("_puts", table)
    try:
        con.execute(
            f"INSERT INTO record_log (v, {_COLUMNS}) "
            "SELECT ?, did, collection, rkey, cid, rev, record::JSON, TRY_CAST(created_at AS TIMESTAMPTZ), ?, "
            f"{_DERIVED} FROM _puts",
            [v, now],
        )
        refs.append(con, v, "_puts", _DERIVED)
    finally:
        con.unregister("_puts")


def append_deletes(con: duckdb.DuckDBPyConnection, v: int, keys: pa.Table, now: datetime) -> None:
    """Append deletions of the (did, collection, rkey) keys of `keys`, at the rev of its `rev`
    column (the commit that removed the key; without the column, or null: unknown)."""
    rev = "rev" if "rev" in keys.schema.names else "NULL"
    con.register("_dels", keys)
    try:
        con.execute(
            "INSERT INTO record_log (v, did, collection, rkey, rev, indexed_at) "
            f"SELECT ?, did, collection, rkey, {rev}, ? FROM _dels",
            [v, now],
        )
    finally:
        con.unregister("_dels")


def append_purges(con: duckdb.DuckDBPyConnection, v: int, dids: list[str]) -> None:
    """Every record of these DIDs written before `v` is gone (account deleted)."""
    con.register("_purged", pa.table({"did": dids}))
    try:
        con.execute("INSERT INTO record_purges SELECT ?, did FROM _purged", [v])
    finally:
        con.unregister("_purged")


@dataclass(frozen=True, slots=True)
class RecordCompaction:
    upto_v: int
    log_rows: int        # log rows folded (and removed from the log)
    purges: int          # purge rows folded
    base_deleted: int    # base rows replaced, deleted or purged
    base_inserted: int   # live versions moved into the base
    seconds: float


def compact_records(con: duckdb.DuckDBPyConnection, upto_v: int, *,
                    keep_deletes_since: datetime | None = None) -> RecordCompaction:
    """Fold every log and purge row with v <= upto_v into the base. Call inside a transaction.

    `keep_deletes_since` (a lake): deletion rows with a rev written since then are folded but stay in the log,
    so an older put of the key from a transaction still in flight (it began before the delete and
    commits after this compaction) still loses to the delete by rev; a later compaction drops them."""
    started = time.perf_counter()
    log_rows = int(con.execute("SELECT count(*) FROM record_log WHERE v <= ?", [upto_v]).fetchall()[0][0])
    purges = int(con.execute("SELECT count(*) FROM record_purges WHERE v <= ?", [upto_v]).fetchall()[0][0])
    deleted = 0
    if purges:
        deleted += _count(con.execute(
            "DELETE FROM record_base WHERE did IN (SELECT did FROM record_purges WHERE v <= ?)", [upto_v]))
    inserted = 0
    if log_rows:
        # the newest version of each logged key by (rev, v): NEWEST_SQL, the view's rule
        con.execute(f"CREATE OR REPLACE TEMP TABLE _newest AS SELECT v, did, collection, rkey, _m FROM ({NEWEST_SQL.format(where='v <= $v')})",
                    {"v": upto_v})
        try:
            in_base = _logged_dids_in_base(con, upto_v)
            # Named parameters: DuckDB 1.5 numbers the `?` of a USING subquery after the WHERE's.
            dids = {f"d{i}": did for i, did in enumerate(in_base or ())}
            only = f"b.did IN ({', '.join('$' + name for name in dids)})" if dids else "b.did IN (SELECT did FROM _newest)"
            kept = "TRUE"
            if in_base is None or in_base:
                # a base row stays only when its rev is strictly newer than its key's newest version
                deleted += _count(con.execute(
                    "DELETE FROM record_base b USING _newest l "
                    "WHERE b.did = l.did AND b.collection = l.collection AND b.rkey = l.rkey "
                    f"AND l._m >= coalesce(b.rev, '') AND {only}",
                    dids,
                ))
                kept = (f"NOT EXISTS (SELECT 1 FROM record_base b WHERE {only} AND b.did = n.did "
                        "AND b.collection = n.collection AND b.rkey = n.rkey)")
            inserted = _count(con.execute(
                f"INSERT INTO record_base ({BASE_COLUMNS}) "
                f"SELECT {_TO_BASE} FROM (SELECT r.* FROM record_log r SEMI JOIN _newest n "
                "ON r.v = n.v AND r.did = n.did AND r.collection = n.collection AND r.rkey = n.rkey) n "
                "WHERE n.cid IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM record_purges p WHERE p.did = n.did AND p.v > n.v AND p.v <= $v) "
                f"AND {kept} ORDER BY did, collection, rkey",
                {"v": upto_v, **dids},
            ))
        finally:
            con.execute("DROP TABLE IF EXISTS _newest")
        if keep_deletes_since is None:
            con.execute("DELETE FROM record_log WHERE v <= ?", [upto_v])
        else:
            # a deletion without a rev cannot be ordered against that put anyway, and would hide newer base rows
            con.execute("DELETE FROM record_log WHERE v <= ? AND (cid IS NOT NULL OR rev IS NULL OR indexed_at < ?)",
                        [upto_v, keep_deletes_since])
    if purges:
        con.execute("DELETE FROM record_purges WHERE v <= ?", [upto_v])
    return RecordCompaction(upto_v=upto_v, log_rows=log_rows, purges=purges, base_deleted=deleted,
                            base_inserted=inserted, seconds=time.perf_counter() - started)


# Up to this many logged DIDs, compaction first finds which of them the base holds (reading only
# the base's `did` column, pruned by zone maps) and deletes among their rows only. At 10^8 records
# the three-key join reads every base key: 17 s for 16 logged DIDs none of which is in the base,
# against 0.1 s for the `did` alone; 1,000 DIDs as a constant list prune to 2.4 s.
_PREFILTER_DIDS = 1_000


def _logged_dids_in_base(con: duckdb.DuckDBPyConnection, upto_v: int) -> list[str] | None:
    """The DIDs with log rows (v <= upto_v) that have base rows; None: too many to list."""
    logged = int(con.execute("SELECT count(DISTINCT did) FROM record_log WHERE v <= ?", [upto_v]).fetchall()[0][0])
    if logged > _PREFILTER_DIDS:
        return None
    rows = con.execute(
        "SELECT DISTINCT b.did FROM record_base b SEMI JOIN (SELECT DISTINCT did FROM record_log WHERE v <= ?) l "
        "ON b.did = l.did", [upto_v]).fetchall()
    return [r[0] for r in rows]


def _count(result: duckdb.DuckDBPyConnection) -> int:
    rows = result.fetchall()
    return int(rows[0][0]) if rows else 0


def migrate_records_v1(con: duckdb.DuckDBPyConnection) -> int:
    """Move a v1 `records` table (primary key, upserted) into record_base and drop it.

    The v1 layout kept no firehose time, so migrated rows get the TID time of their rkey, else
    of their rev, as event_at (the backfill rule). Call inside the migrating transaction, after
    the v2 tables exist and before the views are created. Returns the rows moved."""
    moved = _count(con.execute(
        f"INSERT INTO record_base ({BASE_COLUMNS}) SELECT {_TO_BASE} FROM ("
        "SELECT did, collection, rkey, cid_bin(cid) AS cid, rev, record, created_at, indexed_at, "
        "coalesce(tid_time(rkey), tid_time(rev)) AS event_at "
        "FROM records) ORDER BY did, collection, rkey"
    ))
    con.execute("DROP TABLE records")
    return moved


def _column_type(con: duckdb.DuckDBPyConnection, table: str, column: str) -> str | None:
    rows = con.execute(
        "SELECT data_type FROM duckdb_columns() WHERE database_name = current_database() AND schema_name = 'main' "
        "AND table_name = ? AND column_name = ?", [table, column]).fetchall()
    return str(rows[0][0]) if rows else None


def migrate_records_text_cids(con: duckdb.DuckDBPyConnection) -> int:
    """Schema version 2 -> 3: the `cid` columns of record_base and record_log from CID text to
    cid_bin (storage/cids.py), when they are still text. Conditioned on the column type alone, so
    it composes with any other migration of these tables, in either order. Call inside the
    migrating transaction, after the macros exist. Returns the rows converted."""
    converted = 0
    for table in ("record_base", "record_log"):
        if _column_type(con, table, "cid") == "VARCHAR":
            converted += int(con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])
            con.execute(f"ALTER TABLE {table} ALTER cid TYPE BLOB USING cid_bin(cid)")
    return converted


def has_created_at_column(con: duckdb.DuckDBPyConnection) -> bool:
    """record_base still keeps `created_at` as a timestamp (schema version 4 and before)."""
    return _column_type(con, "record_base", "created_at") is not None


def migrate_created_offsets(con: duckdb.DuckDBPyConnection, old: str) -> int:
    """Schema version 4 -> 5: copy the renamed record_base `old` (created_at a timestamp) into the
    new record_base (created_us after event_at, created_raw), in its order (a plain INSERT SELECT
    keeps it and streams; an ORDER BY rowid sorted 10M rows in memory: 7 GB), and drop it. Call
    inside the migrating transaction, after the new record_base and the macros exist. Returns the
    rows copied. Conditioned on the column alone (has_created_at_column), like the CID migration."""
    copied = _count(con.execute(
        f"INSERT INTO record_base ({BASE_COLUMNS}) SELECT {_TO_BASE} FROM {old}"))
    con.execute(f"DROP TABLE {old}")
    return copied
