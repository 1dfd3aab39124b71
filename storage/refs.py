"""Referenced DIDs by hour: which DIDs the records seen in each hour referenced.

The `referenced` gap reason asks "which DIDs did records seen in [start, end] like, repost,
reply to, quote or follow?". Read from the records themselves, that scans every record: the
event_at window prunes nothing in a base sorted by did (8 s at 10^8 records). So each write
also appends, in its own transaction, the distinct (hour, referenced DID) pairs of its records:

    ref_log   (v, hour, did)  appended with the records (`append`); v = the batch's write version
    ref_base  (hour, did)     one row per pair as of the last compaction, sorted by (hour, did)

`hour` is the record's event_at truncated to the hour (UTC, `ref_hour`), and the DIDs come from
the `record_refs(collection, record)` macro (storage/schema.sql). A window is answered from the
hours it touches, rounded outward to whole hours (`REFERENCED_SQL`): a superset of the DIDs
referenced inside the window. The pairs are never removed: a record deleted after it was seen
still counts as seen in its hour (a backfill too many, never a hole).

`compact(con, upto_v)` folds log rows with v <= upto_v into the base, inserting only the pairs
the base lacks; like the other logs it runs beside the writers (it deletes only what it folded).
"""

from __future__ import annotations

from typing import Final

import duckdb

__all__ = ["REFS_DDL", "REFERENCED_SQL", "append", "compact", "resort", "fill_from", "has_refs_column",
           "migrate_refs_column"]

# the hour of a timestamp, independent of the session's TimeZone (date_trunc on TIMESTAMPTZ is not)
REFS_DDL: Final = """
CREATE OR REPLACE MACRO ref_hour(t) AS make_timestamptz(epoch_us(t) // 3600000000 * 3600000000);
CREATE TABLE IF NOT EXISTS ref_log (v BIGINT NOT NULL, hour TIMESTAMPTZ NOT NULL, did VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS ref_base (hour TIMESTAMPTZ NOT NULL, did VARCHAR NOT NULL);
"""

# The DIDs referenced by records seen in the hours [start, end] touches (parameters $start, $end):
# every hour h with h <= end and h + 1 hour > start, i.e. the window rounded outward to hours.
REFERENCED_SQL: Final = """
SELECT did FROM ref_base WHERE hour >= ref_hour($start) AND hour <= ref_hour($end)
UNION
SELECT did FROM ref_log WHERE hour >= ref_hour($start) AND hour <= ref_hour($end)
"""


def append(con: duckdb.DuckDBPyConnection, v: int, source: str, event_at_sql: str) -> None:
    """Append the distinct (hour, did) pairs of the records in `source` (a registered relation
    with collection and record columns; `event_at_sql` computes its rows' event time)."""
    con.execute(
        "INSERT INTO ref_log SELECT DISTINCT ?, ref_hour(seen), did FROM ("
        f"SELECT {event_at_sql} AS seen, unnest(record_refs(collection, record::JSON)) AS did FROM {source}"
        ") WHERE seen IS NOT NULL",
        [v],
    )


def fill_from(con: duckdb.DuckDBPyConnection, records: str) -> None:
    """Add the pairs of every row of `records` (a table with collection, record, event_at) to the
    base, deduplicated (a migration: the refs are computed from the bodies)."""
    con.execute(
        "INSERT INTO ref_base SELECT DISTINCT ref_hour(event_at) AS hour, did FROM ("
        f"SELECT event_at, unnest(record_refs(collection, record)) AS did FROM {records} WHERE event_at IS NOT NULL"
        ") ORDER BY hour, did"
    )


def compact(con: duckdb.DuckDBPyConnection, upto_v: int) -> int:
    """Fold the log rows with v <= upto_v into the base (pairs it lacks, sorted), in the caller's
    transaction. Returns the pairs added."""
    added = con.execute(
        "INSERT INTO ref_base "
        "SELECT hour, did FROM (SELECT DISTINCT hour, did FROM ref_log WHERE v <= $v) l "
        "ANTI JOIN (SELECT hour, did FROM ref_base WHERE hour IN (SELECT hour FROM ref_log WHERE v <= $v)) b "
        "USING (hour, did) ORDER BY hour, did",
        {"v": upto_v},
    ).fetchall()
    con.execute("DELETE FROM ref_log WHERE v <= ?", [upto_v])
    return int(added[0][0]) if added else 0


def resort(con: duckdb.DuckDBPyConnection) -> None:
    """Rewrite ref_base sorted by (hour, did) (a full compaction; `compact` appends sorted runs)."""
    con.execute("CREATE OR REPLACE TEMP TABLE _ref_sorted AS SELECT hour, did FROM ref_base ORDER BY hour, did")
    try:
        con.execute("DELETE FROM ref_base")
        con.execute("INSERT INTO ref_base SELECT hour, did FROM _ref_sorted ORDER BY hour, did")
    finally:
        con.execute("DROP TABLE IF EXISTS _ref_sorted")


def has_refs_column(con: duckdb.DuckDBPyConnection) -> bool:
    """record_base still has the per-record `refs VARCHAR[]` column of schema version 2."""
    rows = con.execute(
        "SELECT count(*) FROM duckdb_columns() WHERE database_name = current_database() "
        "AND schema_name = current_schema() AND table_name = 'record_base' AND column_name = 'refs'"
    ).fetchall()
    return bool(rows[0][0])


def migrate_refs_column(con: duckdb.DuckDBPyConnection) -> int:
    """Move the per-record `refs` column of record_base and record_log into ref_base and drop it
    (inside the migrating transaction, before the views are re-created). Returns the pairs."""
    con.execute("DROP VIEW IF EXISTS records CASCADE")  # it names the column; views.sql re-creates it
    con.execute(
        "INSERT INTO ref_base SELECT DISTINCT ref_hour(event_at) AS hour, did FROM ("
        "SELECT event_at, unnest(refs) AS did FROM record_base WHERE refs IS NOT NULL AND event_at IS NOT NULL "
        "UNION ALL "
        "SELECT event_at, unnest(refs) FROM record_log WHERE refs IS NOT NULL AND event_at IS NOT NULL"
        ") ORDER BY hour, did"
    )
    pairs = int(con.execute("SELECT count(*) FROM ref_base").fetchall()[0][0])
    con.execute("ALTER TABLE record_base DROP COLUMN refs")
    con.execute("ALTER TABLE record_log DROP COLUMN refs")
    return pairs
