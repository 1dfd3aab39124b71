"""Per-DID state (`repos`) as an append-only log over a deduplicated base, merged by a view.

Layout (no primary key, no UPDATE: every write is an append, see docs in DESIGN11):
    repo_base   one row per DID, sorted by did when built (a point read is served by zone maps)
    repo_log    appended rows `(v, part, did, <every repos column>)`: `v` is the write version of
                the transaction, `part` says which column group of the row is authoritative:
                  head      rev .. first_seen_at (what the firehose owns, `HEAD_FIELDS`)
                  backfill  backfill_status .. backfilled_rev (`BACKFILL_FIELDS`)
                A writer appends the WHOLE group it owns; the other group's columns hold the
                defaults and count only for a DID that has no row of that group anywhere.
    repos       the view: one row per DID, same columns and meaning as the v1 table.

Both tables also hold `k`, the DID's key (`KEY_SQL`, the low 64 bits of its MD5, set by every
insert): the view and the gap reasons join logged DIDs to the base by `k` (on the 32-char `did`,
all 10M base DIDs were decoded and hashed: 4-6 s with a full log). Two DIDs may share a `k`: a
set taken by `k` is a superset, merged per `did`, so a shared key costs a read, never an answer.

Merge rule (the view and `compact` share it): per DID and group, the log row of that group with the
highest v wins, else the base row (version 0), else the other group's newest row (its defaults); but
the repo's version (`REV_FIELDS`) comes from the head row (log or base) with the newest rev, then the
highest v (a row without a rev never wins it): on a lake two writers of one DID may commit in the
other order than they took v, and the newest rev must win (records.py). `first_seen_at` is
write-once: the oldest stored value. A transaction writes at most one row per (did, part).

`compact(con, upto_v)` folds log rows with v <= upto_v into the base, deleting only base rows it
replaces and log rows it folded: it runs on its own cursor and transaction while writers append.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import duckdb
import pyarrow as pa

from .lake import run_ddl

__all__ = [
    "HEAD_FIELDS", "BACKFILL_FIELDS", "REPO_COLUMNS", "REPOS_DDL", "create_repos", "is_v1", "migrate_v1",
    "append_head", "append_head_row", "append_backfills", "current_rows", "point_sql", "merge_point", "resort", "current_row", "compact",
    "count_heads_sql", "migrate_v4", "subset_sql", "KEY_SQL", "REV_FIELDS",
]

log = logging.getLogger(__name__)

# column -> (type, DEFAULT/NOT NULL of the v1 table), in the v1 table's order
_COLUMNS: Final[dict[str, tuple[str, str]]] = {
    "rev": ("VARCHAR", ""),
    "data_cid": ("VARCHAR", ""),
    "commit_cid": ("VARCHAR", ""),
    "last_seq": ("BIGINT", ""),
    "last_event_at": ("TIMESTAMPTZ", ""),
    "handle": ("VARCHAR", ""),
    "active": ("BOOLEAN", "NOT NULL DEFAULT TRUE"),
    "status": ("VARCHAR", "NOT NULL DEFAULT 'active'"),
    "sync_state": ("VARCHAR", "NOT NULL DEFAULT 'unknown'"),
    "desync_reason": ("VARCHAR", ""),
    "desynced_at": ("TIMESTAMPTZ", ""),
    "first_seen_at": ("TIMESTAMPTZ", "NOT NULL"),
    "backfill_status": ("VARCHAR", ""),
    "backfill_error": ("VARCHAR", ""),
    "backfill_attempts": ("INTEGER", "NOT NULL DEFAULT 0"),
    "backfill_retry_after": ("TIMESTAMPTZ", ""),
    "backfilled_at": ("TIMESTAMPTZ", ""),
    "backfilled_rev": ("VARCHAR", ""),
    # the backfill run whose reconcile set backfilled_at (the "backfill complete" signal, per run);
    # added after schema version 2's first release: `create_repos` adds it to older files
    "backfill_run": ("VARCHAR", ""),
}
_ADDED: Final = ("backfill_run",)  # columns a v1 `repos` table does not have
REPO_COLUMNS: Final = ("did", *_COLUMNS)
HEAD_FIELDS: Final = tuple(list(_COLUMNS)[: list(_COLUMNS).index("first_seen_at") + 1])
BACKFILL_FIELDS: Final = tuple(c for c in _COLUMNS if c not in HEAD_FIELDS)
_HEAD, _BACKFILL = "head", "backfill"
# the DID's key (see the module docstring): md5 is stable across DuckDB versions, unlike hash()
KEY_SQL: Final = "md5_number_lower(did)"
_MERGED_HEAD: Final = tuple(c for c in HEAD_FIELDS if c != "first_seen_at")
# the head columns that name the repo's version: merged by (rev, v), the others by v (module docstring)
REV_FIELDS: Final = ("rev", "data_cid", "commit_cid")
# repo_base keeps these binary (storage/cids.py's cid_bin: ~2 B a record fewer); the log and the view: text
_BINARY_CIDS: Final = ("data_cid", "commit_cid")


def _from_base(columns: Iterable[str]) -> str:
    """The select list reading `columns` from repo_base as the view shows them (CIDs as text)."""
    return ", ".join(f"cid_text({c}) AS {c}" if c in _BINARY_CIDS else c for c in columns)


def _to_base(columns: Iterable[str]) -> str:
    """The select list writing `columns` (as the view shows them) into repo_base."""
    return ", ".join(f"cid_bin({c})" if c in _BINARY_CIDS else c for c in columns)


def _base_columns() -> str:
    return ",\n    ".join(f"{name} {'BLOB' if name in _BINARY_CIDS else typ} {rule}".rstrip()
                          for name, (typ, rule) in _COLUMNS.items())


def _log_columns() -> str:
    # NOT NULL is the writer's business in the log; the defaults fill the group a row does not own
    return ",\n    ".join(
        f"{name} {typ}" + (" " + rule.replace("NOT NULL ", "") if "DEFAULT" in rule else "")
        for name, (typ, rule) in _COLUMNS.items()
    )


_CREATE_TABLES: Final = f"""
CREATE SEQUENCE IF NOT EXISTS write_version;
-- one row per DID: the state folded in by the last compaction (see storage/repos.py)
CREATE TABLE IF NOT EXISTS repo_base (
    did VARCHAR NOT NULL,
    {_base_columns()},
    k UBIGINT NOT NULL
);
-- appended by every write; `part` names the authoritative column group ('head' | 'backfill')
CREATE TABLE IF NOT EXISTS repo_log (
    v BIGINT NOT NULL,
    part VARCHAR NOT NULL,
    did VARCHAR NOT NULL,
    {_log_columns()},
    k UBIGINT NOT NULL
);
"""


def _merged_sql(keys: str, log_where: str = "TRUE") -> str:
    """One merged row per DID of the base rows whose `k` is in `keys` (a query of `k` values) and
    the log rows matching `log_where` (the caller makes their keys a subset of `keys`): every DID
    whose log rows are merged must have its base row read too.

    One aggregate per column (not one struct per group): a query on the view that needs a few
    columns reads only those of repo_base (DuckDB drops the unused aggregates and their inputs),
    where a struct of every column read the whole row of every base row (8 s at 10M DIDs).
    Grouped by `did`, not `k`: a base row read only because its DID shares a key with a logged
    DID is a group of its own, its base row unchanged."""
    cols = ", ".join(_COLUMNS)
    out = ", ".join(
        [f"arg_max_null({c}, {'rv' if c in REV_FIELDS else 'hv'}) AS {c}" for c in _MERGED_HEAD]
        + ["arg_min(first_seen_at, v) AS first_seen_at"]
        + [f"arg_max_null({c}, fv) AS {c}" for c in BACKFILL_FIELDS]
    )
    return f"""SELECT did, {out} FROM (
    SELECT *, struct_pack(r := CASE WHEN hv >= 0 THEN coalesce(rev, '') ELSE '' END, v := hv) AS rv FROM (
    SELECT did, 0 AS v, 0 AS hv, 0 AS fv, {_from_base(_COLUMNS)} FROM repo_base
    WHERE k IN ({keys})
    UNION ALL
    SELECT did, v, CASE WHEN part = '{_HEAD}' THEN v ELSE -1 END, CASE WHEN part = '{_BACKFILL}' THEN v ELSE -1 END,
           {cols} FROM repo_log WHERE {log_where}
)) GROUP BY did"""


# Base rows whose key no log row has, and the merge of every base row whose key a log row has
# (a base DID that only shares a key with a logged DID comes out of the merge unchanged).
_VIEW: Final = f"""CREATE OR REPLACE VIEW repos AS
SELECT did, {_from_base(_COLUMNS)} FROM repo_base b WHERE b.k NOT IN (SELECT k FROM repo_log)
UNION ALL
{_merged_sql("SELECT k FROM repo_log")}"""


def subset_sql(head_where: str = "TRUE", *, keys: str | None = None) -> str:
    """Rows of the `repos` view (did and every column) for a superset of the DIDs whose row meets
    `head_where`, and whose key is in `keys` when given (a query of `k` values, e.g.
    `SELECT md5_number_lower(did) AS k FROM wanted`): the caller applies its whole condition
    (which must imply `head_where`) and its did join on top.

    `head_where` names head columns only (HEAD_FIELDS but first_seen_at, which is write-once and
    merged from the oldest row, and but the CIDs, binary in repo_base): for a logged DID it is tested on its newest head log row, which
    gives the view's head columns. So only the logged DIDs that may meet it are merged with their
    base rows (the view merges all of them, 230k DIDs at 100M with a full log): those whose newest
    head row meets it, those without a head row, and those whose base row meets it (by key: a base
    DID that only shares a key with a logged DID is merged as its own group)."""
    in_keys = f" AND k IN ({keys})" if keys else ""
    candidates = f"""
    SELECT k FROM (
        SELECT * FROM repo_log WHERE part = '{_HEAD}'{in_keys}
        QUALIFY row_number() OVER (PARTITION BY did ORDER BY v DESC) = 1
    ) WHERE {head_where}
    UNION ALL
    SELECT k FROM repo_log WHERE part <> '{_HEAD}'{in_keys}
        AND did NOT IN (SELECT did FROM repo_log WHERE part = '{_HEAD}')
    UNION ALL
    SELECT k FROM repo_base WHERE ({head_where}){in_keys} AND k IN (SELECT k FROM repo_log)"""
    return f"""WITH _candidates AS MATERIALIZED ({candidates})
SELECT did, {_from_base(_COLUMNS)} FROM repo_base WHERE ({head_where}){in_keys} AND k NOT IN (SELECT k FROM repo_log)
UNION ALL
{_merged_sql("SELECT k FROM _candidates", "k IN (SELECT k FROM _candidates)")}"""


REPOS_DDL: Final = _CREATE_TABLES + _VIEW + ";\n"


def create_repos(con: duckdb.DuckDBPyConnection) -> None:
    """The v2 tables and the `repos` view, if missing (the view is re-created: always current)."""
    run_ddl(con, _CREATE_TABLES)
    for table in ("repo_base", "repo_log"):
        for name in _ADDED:
            con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {_COLUMNS[name][0]}")
    migrate_v4(con)
    con.execute(_VIEW)


def _has_column(con: duckdb.DuckDBPyConnection, column: str, data_type: str | None = None) -> bool:
    rows = con.execute(
        "SELECT data_type FROM duckdb_columns() WHERE database_name = current_database() "
        "AND schema_name = current_schema() AND table_name = 'repo_base' AND column_name = ?", [column]
    ).fetchall()
    return bool(rows) and data_type in (None, rows[0][0])


def migrate_v4(con: duckdb.DuckDBPyConnection) -> int:
    """Schema version 4 -> 5, inside the migrating transaction, conditioned on the columns: a
    repo_base without the DID key `k` or with text CIDs is rebuilt with the key (sorted by did)
    and binary CIDs (cid_bin), and repo_log given the key. Returns the base rows rewritten."""
    text_cids = _has_column(con, "data_cid", "VARCHAR")
    if _has_column(con, "k") and not text_cids:
        return 0
    started = time.monotonic()
    con.execute("DROP VIEW IF EXISTS repos")
    con.execute("ALTER TABLE repo_base RENAME TO repo_base_v4")
    con.execute("ALTER TABLE repo_log RENAME TO repo_log_v4")
    run_ddl(con, _CREATE_TABLES)
    cols = ", ".join(REPO_COLUMNS)
    select = _to_base(REPO_COLUMNS) if text_cids else cols
    con.execute(f"INSERT INTO repo_base ({cols}, k) SELECT {select}, {KEY_SQL} FROM repo_base_v4 ORDER BY did")
    con.execute(f"INSERT INTO repo_log (v, part, {cols}, k) SELECT v, part, {cols}, {KEY_SQL} FROM repo_log_v4")
    con.execute("DROP TABLE repo_base_v4; DROP TABLE repo_log_v4")
    n = int(con.execute("SELECT count(*) FROM repo_base").fetchall()[0][0])
    log.info("repos: the DID key added%s", ", CIDs made binary" if text_cids else "",
             extra={"ctx": {"rows": n, "seconds": round(time.monotonic() - started, 3)}})
    return n


def is_v1(con: duckdb.DuckDBPyConnection) -> bool:
    """The file holds a v1 `repos` (a base table, with its primary key) to migrate."""
    rows = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'repos' AND schema_name = current_schema() "
        "AND database_name = current_database()"
    ).fetchall()
    return bool(rows[0][0])


def migrate_v1(con: duckdb.DuckDBPyConnection) -> int:
    """Turn a v1 `repos` table into repo_base (sorted by did), repo_log and the view; the caller
    holds the transaction. Returns the rows copied."""
    started = time.monotonic()
    con.execute("ALTER TABLE repos RENAME TO repos_v1")
    run_ddl(con, _CREATE_TABLES)
    cols = ", ".join(c for c in REPO_COLUMNS if c not in _ADDED)
    con.execute(f"INSERT INTO repo_base ({cols}, k) SELECT {_to_base(cols.split(', '))}, {KEY_SQL} FROM repos_v1 ORDER BY did")
    count = int(con.execute("SELECT count(*) FROM repo_base").fetchall()[0][0])
    con.execute("DROP TABLE repos_v1")
    con.execute(_VIEW)
    log.info("migrated repos to the v2 layout", extra={"ctx": {"rows": count, "seconds": round(time.monotonic() - started, 3)}})
    return count


# -- writes (inside the caller's transaction, `v` = its write version) ---------------------------

def append_head(con: duckdb.DuckDBPyConnection, v: int, table: pa.Table) -> None:
    """Append head groups: `table` has did and every HEAD_FIELDS column (last_event_at may be the
    event's ISO text: it is parsed here). One row per DID."""
    select = ", ".join(
        f"TRY_CAST({c} AS TIMESTAMPTZ)" if c == "last_event_at" and table.schema.field(c).type == pa.string() else c
        for c in HEAD_FIELDS
    )
    con.register("_repo_heads", table)
    try:
        con.execute(
            f"INSERT INTO repo_log (v, part, did, k, {', '.join(HEAD_FIELDS)}) "
            f"SELECT ?, '{_HEAD}', did, {KEY_SQL}, {select} FROM _repo_heads",
            [v],
        )
    finally:
        con.unregister("_repo_heads")


def append_head_row(con: duckdb.DuckDBPyConnection, v: int, did: str, head: Mapping[str, Any]) -> None:
    """Append one DID's head group (`head` holds every HEAD_FIELDS column)."""
    names = ", ".join(HEAD_FIELDS)
    marks = ", ".join("?" for _ in HEAD_FIELDS)
    con.execute(
        f"INSERT INTO repo_log (v, part, did, k, {names}) VALUES (?, '{_HEAD}', ?, md5_number_lower(?), {marks})",
        [v, did, did, *(head[c] for c in HEAD_FIELDS)],
    )


def append_backfills(con: duckdb.DuckDBPyConnection, v: int, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append backfill groups, one statement: each row holds `did`, `first_seen_at` and every
    BACKFILL_FIELDS column."""
    if not rows:
        return
    names = ("did", "first_seen_at", *BACKFILL_FIELDS)
    table = pa.table({c: [r[c] for r in rows] for c in names})
    select = ", ".join(f"CAST({c} AS {_COLUMNS[c][0]})" if c in _COLUMNS else c for c in names)
    con.register("_repo_backfills", table)
    try:
        con.execute(
            f"INSERT INTO repo_log (v, part, k, {', '.join(names)}) "
            f"SELECT ?, '{_BACKFILL}', {KEY_SQL}, {select} FROM _repo_backfills",
            [v],
        )
    finally:
        con.unregister("_repo_backfills")


# -- reads -----------------------------------------------------------------------------------------

def current_row(con: duckdb.DuckDBPyConnection, did: str) -> dict[str, Any] | None:
    """The `repos` row of `did` as this transaction sees it (a point read), or None."""
    rows = con.execute(f"SELECT {', '.join(REPO_COLUMNS)} FROM repos WHERE did = ?", [did]).fetchall()
    return dict(zip(REPO_COLUMNS, rows[0], strict=True)) if rows else None


def current_rows(con: duckdb.DuckDBPyConnection, dids: Sequence[str], columns: Iterable[str]) -> list[tuple[Any, ...]]:
    """`did, <columns>` of the `repos` rows of `dids` (a point read each: zone maps on the base)."""
    cols = ", ".join(["did", *columns])
    if len(dids) == 1:
        return con.execute(f"SELECT {cols} FROM repos WHERE did = ?", [dids[0]]).fetchall()
    marks = ", ".join("?" for _ in dids)
    return con.execute(f"SELECT {cols} FROM repos WHERE did IN ({marks})", list(dids)).fetchall()


def point_sql(columns: Sequence[str]) -> str:
    """One DID's base row (v 0, part 'base') and log rows, oldest first, in one statement (one
    snapshot; parameters: did twice). `merge_point` makes them the view's row: two plain point
    reads, where planning the view itself costs several times the reads."""
    cols = ", ".join(columns)
    return (f"SELECT 0 AS v, 'base' AS part, {_from_base(columns)} FROM repo_base WHERE did = ? "
            f"UNION ALL SELECT v, part, {cols} FROM repo_log WHERE did = ? ORDER BY v")


def merge_point(columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> tuple[Any, ...] | None:
    """The view's values of `columns` (head columns only) from `point_sql`'s rows, or None."""
    if not rows:
        return None
    heads = [row[2:] for row in rows if row[1] in (_HEAD, "base")]
    values = list(heads[-1] if heads else rows[-1][2:])
    if "rev" in columns and heads:  # the repo's version: the newest rev, then the newest v
        at = [list(columns).index(c) for c in REV_FIELDS if c in columns]
        newest = max(enumerate(heads), key=lambda row: (row[1][at[0]] or "", row[0]))[1]
        for i in at:
            values[i] = newest[i]
    if "first_seen_at" in columns:  # write-once: the oldest stored value (the base's, else the lowest v)
        at = list(columns).index("first_seen_at")
        values[at] = rows[0][2:][at]
    return tuple(values)


def count_heads_sql(condition: str) -> str:
    """`SELECT count(*) FROM repos WHERE <condition>` for a condition on head columns that a new
    DID's defaults do not meet (e.g. sync_state = 'desynchronized'): base rows of DIDs without a
    head log row, plus each DID's newest head log row (the view's merge: 13 s at 10M DIDs)."""
    return f"""SELECT (
    SELECT count(*) FROM repo_base b ANTI JOIN (SELECT did FROM repo_log WHERE part = '{_HEAD}') h ON h.did = b.did
    WHERE {condition}
) + (
    SELECT count(*) FROM (
        SELECT * FROM repo_log WHERE part = '{_HEAD}' QUALIFY row_number() OVER (PARTITION BY did ORDER BY v DESC) = 1
    ) WHERE {condition}
)"""


# -- compaction --------------------------------------------------------------------------------------

def compact(con: duckdb.DuckDBPyConnection, upto_v: int) -> int:
    """Fold the log rows with v <= upto_v into repo_base, in the caller's transaction (its own
    cursor: writers keep appending meanwhile). Returns the DIDs whose base row was rewritten."""
    where = f"v <= {int(upto_v)}"
    con.execute(f"CREATE OR REPLACE TEMP TABLE _repo_merged AS {_merged_sql(f'SELECT k FROM repo_log WHERE {where}', where)}")
    try:
        n = int(con.execute("SELECT count(*) FROM _repo_merged").fetchall()[0][0])
        if n:
            con.execute("DELETE FROM repo_base WHERE did IN (SELECT did FROM _repo_merged)")
            cols = ", ".join(REPO_COLUMNS)
            con.execute(f"INSERT INTO repo_base ({cols}, k) SELECT {_to_base(REPO_COLUMNS)}, {KEY_SQL} "
                        "FROM _repo_merged ORDER BY did")
            con.execute(f"DELETE FROM repo_log WHERE {where}")
    finally:
        con.execute("DROP TABLE IF EXISTS _repo_merged")
    return n


def resort(con: duckdb.DuckDBPyConnection) -> int:
    """Rewrite repo_base sorted by did, in the caller's transaction (own cursor, like `compact`).

    `compact` appends the rows it rewrites at the end of the base, sorted among themselves only:
    those row groups span every did, so each point read also scans them. Call this when they
    add up to a few row groups (122,880 rows each). Returns the rows rewritten."""
    cols = ", ".join((*REPO_COLUMNS, "k"))
    con.execute(f"CREATE OR REPLACE TEMP TABLE _repo_sorted AS SELECT {cols} FROM repo_base ORDER BY did")
    try:
        con.execute("DELETE FROM repo_base")
        con.execute(f"INSERT INTO repo_base ({cols}) SELECT {cols} FROM _repo_sorted ORDER BY did")
        return int(con.execute("SELECT count(*) FROM repo_base").fetchall()[0][0])
    finally:
        con.execute("DROP TABLE IF EXISTS _repo_sorted")
