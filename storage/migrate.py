"""Bring a database file to the current schema when it is opened.

    schema_version 1   `records` and `repos` were tables with primary keys, upserted in place
    schema_version 2   versioned logs + compacted bases behind `records` and `repos` views
                       (a file written before storage/refs.py keeps each record's referenced DIDs
                       in a `refs` column of record_base/record_log: moved into ref_base on open,
                       whatever the schema_version, because the condition is the column itself)
    schema_version 3   record CIDs stored binary (storage/cids.py); the view shows them as text
    schema_version 4   the backfill queue an append-only log (storage/queue_log.py); repos.backfill_run
    schema_version 5   record_base keeps created_at as microseconds after event_at (created_us,
                       created_raw; the view shows created_at): a record_base with a created_at
                       column is copied into the new layout on open (the condition is the column);
                       repo_base keeps data_cid/commit_cid binary (cid_bin) and repo_base/repo_log
                       each DID's integer key `k`: both added by `repos.migrate_v4` in one rebuild
                       (conditioned on those columns)

A writable open creates what is missing and migrates an older file (or a `refs` column) in ONE
transaction (a crash part-way leaves the file as it was), then (re)creates the views. A read-only
open cannot migrate: it refuses such a file with the command that migrates it.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from typing import Final

import duckdb

from skyfill.errors import StorageError

from . import queue_log, refs, repos
from .cids import CID_MACROS_SQL
from .lake import on_lake, run_ddl
from .records import has_created_at_column, migrate_created_offsets, migrate_records_text_cids, migrate_records_v1

__all__ = ["SCHEMA_VERSION", "MIGRATE_COMMAND", "prepare_schema", "schema_version", "schema_sql"]

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 5
MIGRATE_COMMAND: Final = "skyfill migrate --db {path}"


def schema_sql(name: str = "schema.sql") -> str:
    """The text of a packaged SQL file (schema.sql: every table, idempotent; views.sql)."""
    return resources.files("skyfill.storage").joinpath(name).read_text()


def _is_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    rows = con.execute(
        "SELECT 1 FROM duckdb_tables() WHERE database_name = current_database() AND schema_name = 'main' "
        "AND table_name = ?",
        [name],
    ).fetchall()
    return bool(rows)


def schema_version(con: duckdb.DuckDBPyConnection) -> int | None:
    """The file's schema version; None for a new, empty file."""
    if _is_table(con, "meta"):
        rows = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        if rows:
            return int(rows[0][0])
    if _is_table(con, "records"):
        return 1
    return None


def prepare_schema(con: duckdb.DuckDBPyConnection, path: str, *, read_only: bool) -> None:
    """Create, migrate or check the schema of the open file (see the module docstring)."""
    version = schema_version(con)
    if version is not None and version > SCHEMA_VERSION:
        raise StorageError(f"{path} has schema version {version}, newer than this skyfill's "
                           f"{SCHEMA_VERSION}: upgrade skyfill to open it")
    if read_only:
        if version is not None and version < SCHEMA_VERSION:
            raise StorageError(f"{path} is in the schema version {version} layout and this open is read-only: "
                               f"migrate it first with `{MIGRATE_COMMAND.format(path=path)}`")
        if version is not None and refs.has_refs_column(con):
            raise StorageError(f"{path} keeps referenced DIDs per record (the `refs` column) and this open is "
                               f"read-only: migrate it first with `{MIGRATE_COMMAND.format(path=path)}`")
        return
    if version == SCHEMA_VERSION and on_lake(con):
        # every DDL statement on a lake is a catalog transaction in PostgreSQL (seconds in all),
        # and concurrent writers opening at once would conflict on re-creating the same views
        return
    started = time.perf_counter()
    con.execute("BEGIN TRANSACTION")
    try:
        if version is None and on_lake(con):
            # the lake's Parquet files: ZSTD, as the file's `record` column (snappy by default)
            con.execute("CALL set_option('parquet_compression', 'zstd')")
        run_ddl(con, schema_sql("schema.sql"))
        run_ddl(con, refs.REFS_DDL)
        run_ddl(con, CID_MACROS_SQL)
        moved = migrate_records_v1(con) if version == 1 else 0
        if version == 1:
            refs.fill_from(con, "record_base")
        pairs = refs.migrate_refs_column(con) if refs.has_refs_column(con) else None
        moved += migrate_records_text_cids(con)  # v2: text CIDs (a no-op on v1 or new files)
        if has_created_at_column(con):  # v4 and before: created_at a timestamp in record_base
            con.execute("ALTER TABLE record_base RENAME TO record_base_v4")
            run_ddl(con, schema_sql("schema.sql"))  # the new record_base, with its column compression
            moved += migrate_created_offsets(con, "record_base_v4")
        if repos.is_v1(con):
            repos.migrate_v1(con)
        else:
            repos.create_repos(con)  # v4 and before: the DID key and binary CIDs (repos.migrate_v4)
        queue_log.create_queue(con)
        run_ddl(con, schema_sql("views.sql"))
        if on_lake(con):  # no primary key on the lake (storage/lake.py)
            con.execute("DELETE FROM meta WHERE key = 'schema_version'")
            con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        else:
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        con.execute("COMMIT")
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # a failed COMMIT already ended the transaction
        raise
    if version is not None and version < SCHEMA_VERSION:
        log.info("migrated the database to schema version %d", SCHEMA_VERSION,
                 extra={"ctx": {"path": path, "records": moved, "seconds": round(time.perf_counter() - started, 1)}})
    if pairs is not None:
        log.info("moved the records' refs column into ref_base (referenced DIDs by hour)",
                 extra={"ctx": {"path": path, "pairs": pairs, "seconds": round(time.perf_counter() - started, 1)}})
