"""The DuckDB connection under `Store`: opening, transactions, reconnecting, reads, error translation.

DuckDB lets one process write a file. Inside that process the store serialises writes with a
lock, so the firehose batches, backfill reconciliations and queue updates never interleave
inside a transaction. Nothing outside `skyfill.storage` gets the connection: writes are the
named methods of `Store`, reads go through `fetchall` (under the write lock) or `read()` (a
cursor of its own). Every DuckDB failure leaves a public method as StorageError.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from skyfill import metrics
from skyfill.errors import DatabaseLocked, StorageError

from .file_version import newer_file_error
from .lake import connect_lake, has_postgres, is_conflict, is_lake, next_value, use_lake
from .lease import wait_free
from .migrate import prepare_schema

__all__ = ["StoreBase", "Reader", "failure_kind", "storage_errors", "now_utc", "CHECKPOINT_THRESHOLD", "CONFLICT_RETRIES",
           "conflict_pause", "COMPACTION_LEASE"]

# Uncheckpointed rows stay in memory (DuckDB IN_MEMORY_TABLE ~ WAL size), so this trades RSS
# for fewer checkpoints: 64 MB measured ~4x less COMMIT time than 16 MB for ~35 MB more memory.
CHECKPOINT_THRESHOLD = "64MB"
# A lake transaction that lost a conflict to another writer is run again this many times at most.
CONFLICT_RETRIES = 8
# The lake's compaction lease (storage/lease.py): a lake transaction's COMMIT waits while it is held.
COMPACTION_LEASE = "compaction"

# A new file is written in DuckDB 1.5's storage format: under the default (v1.0.0, for old readers)
# DuckDB 1.5 stores the `record` column, declared USING COMPRESSION zstd, uncompressed and strings
# without DICT_FSST: 334 B/record instead of 150 at 1M records. An existing file keeps its format.
_CONFIG = {"storage_compatibility_version": "v1.5.0"}


def now_utc() -> datetime:
    return datetime.now(UTC)


def _message(exc: duckdb.Error, path: str | None) -> str:
    """DuckDB's message; an I/O error (a corrupt or truncated file) also names the file."""
    text = str(exc)
    if path and isinstance(exc, duckdb.IOException) and path not in text:
        return f"{path}: {text}"
    return text


@contextmanager
def storage_errors(path: str | None = None) -> Iterator[None]:
    """A DuckDB failure of a read leaves a public Store method as StorageError, like a write's."""
    try:
        yield
    except duckdb.Error as exc:
        raise StorageError(_message(exc, path)) from exc


class Reader:
    """A read cursor of its own, outside the write lock (see `StoreBase.read`)."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection, path: str | None = None) -> None:
        self._cur = cursor
        self._path = path

    def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with storage_errors(self._path):
            return self._cur.execute(sql, list(params)).fetchall()

    def fetch_arrow(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> pa.Table:
        """The result as an Arrow table (named `$name` parameters as a mapping)."""
        with storage_errors(self._path):
            return self._cur.sql(sql, params=params).to_arrow_table()

    def arrow_batches(self, sql: str, rows: int = 1 << 20) -> Iterator[pa.RecordBatch]:
        """The result as Arrow record batches of up to `rows` rows, streamed: a big result is
        never materialised whole on the Python side."""
        with storage_errors(self._path):
            reader = self._cur.sql(sql).to_arrow_reader(rows)
        while True:
            with storage_errors(self._path):
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
            yield batch

    @contextmanager
    def registered(self, name: str, table: pa.Table) -> Iterator[None]:
        """`table` is queryable as `name` on this cursor inside the block."""
        with storage_errors(self._path):
            self._cur.register(name, table)
        try:
            yield
        finally:
            with storage_errors(self._path):
                self._cur.unregister(name)


def _check_writable_dir(directory: Path) -> None:
    """Make sure DuckDB will be able to write beside the file: it creates `<db>.wal` there on the
    first commit, so a writable file in a read-only directory opens fine and fails only then."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise StorageError(f"cannot write in {str(directory) or '.'}: {exc.strerror or exc}") from exc


class StoreBase:
    """The DuckDB file: one connection, one write lock, one transaction at a time."""

    def __init__(self, path: str | Path, *, read_only: bool = False, memory_limit: str | None = None) -> None:
        self.path = str(path)
        self.lake = is_lake(self.path)  # DuckLake (storage/lake.py), else a DuckDB file
        if self.path != ":memory:" and not read_only and not self.lake:
            _check_writable_dir(Path(self.path).parent)
        try:
            self._conn = self._connect(read_only=read_only)
        except duckdb.Error as exc:
            if isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower():
                raise DatabaseLocked(f"{self.path} is held by another process: {exc}") from exc
            raise newer_file_error(self.path, exc) or StorageError(f"cannot open {self.path}: {exc}") from exc
        self._lock = threading.RLock()
        self._txn_version: int | None = None
        self.read_only = read_only
        # a lake with a PostgreSQL catalog has the compaction lease (storage/lease.py); read once, at
        # open: the compactor's thread must not run queries on the writer's connection
        self.leased = False
        self._lease_cur: duckdb.DuckDBPyConnection | None = None
        try:
            self._prepare(read_only)
            self.leased = self.lake and has_postgres(self._conn)
            if not read_only and not self.lake:
                # DuckDB checkpoints when the WAL passes 16 MB by default, and a checkpoint's cost grows
                # with the table: on 200k firehose frames COMMIT was over half of Store.apply. Durability
                # is unchanged (every COMMIT still syncs the WAL); a crash means a longer WAL replay.
                self._conn.execute(f"SET checkpoint_threshold = '{CHECKPOINT_THRESHOLD}'")
            if memory_limit is not None:
                # DuckDB's buffer pool defaults to 80% of RAM. The big tables have no index that must
                # stay resident, so a small limit holds at any size (joins and sorts spill to disk).
                try:
                    self._conn.execute("SET memory_limit = ?", [memory_limit])
                except duckdb.Error as exc:
                    raise StorageError(f"bad memory limit {memory_limit!r}: {exc}") from exc
        except BaseException as exc:
            self._conn.close()
            if isinstance(exc, duckdb.Error):  # e.g. a file truncated under its own header
                raise StorageError(f"cannot open {self.path}: {exc}") from exc
            raise

    def _connect(self, *, read_only: bool) -> duckdb.DuckDBPyConnection:
        if self.lake:
            return connect_lake(self.path, read_only=read_only)
        return duckdb.connect(self.path, read_only=read_only, config=_CONFIG)

    def _prepare(self, read_only: bool) -> None:
        """Create or migrate the schema; on a lake, again when another writer's schema commit won."""
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                prepare_schema(self._conn, self.path, read_only=read_only)
                return
            except duckdb.Error as exc:
                if not (self.lake and is_conflict(exc)) or attempt == CONFLICT_RETRIES:
                    raise
                metrics.STORE_TXN_RETRIES.inc()
                time.sleep(conflict_pause(attempt))

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of its own on the store's database (on a lake: with the lake in use)."""
        cur = self._conn.cursor()
        return use_lake(cur) if self.lake else cur

    def _version(self, con: duckdb.DuckDBPyConnection) -> int:
        """The write version of the open transaction: one `write_version` value per transaction,
        taken on first use; every log row the transaction appends carries it."""
        if self._txn_version is None:
            self._txn_version = next_value(con, "write_version")[0]
        return self._txn_version

    def close(self) -> None:
        with self._lock, storage_errors(self.path):
            self._conn.close()

    def __enter__(self) -> StoreBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _txn(self, body: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        """Run `body` in one transaction. Every DuckDB failure, COMMIT's included (a full disk
        fails there: the WAL is written at COMMIT), leaves as StorageError with nothing stored.
        On a lake, a transaction that lost a conflict to another writer is run again from the
        start (`body` must only depend on its arguments), at most CONFLICT_RETRIES times."""
        with self._lock:
            attempt = 0
            while True:
                try:
                    return self._txn_once(body)
                except StorageError as exc:
                    if not (self.lake and is_conflict(exc.__cause__ or exc)) or attempt >= CONFLICT_RETRIES:
                        raise
                metrics.STORE_TXN_RETRIES.inc()
                time.sleep(conflict_pause(attempt))
                attempt += 1

    def _txn_once(self, body: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        con = self._conn
        try:
            con.execute("BEGIN TRANSACTION")
        except duckdb.Error as exc:
            raise StorageError(_message(exc, self.path)) from exc
        self._txn_version = None
        try:
            result = body(con)
            self._wait_for_compactor()
            con.execute("COMMIT")
        except BaseException as exc:
            _rollback(con)
            if isinstance(exc, duckdb.Error):
                raise StorageError(_message(exc, self.path)) from exc
            raise
        finally:
            self._txn_version = None
        return result

    def _wait_for_compactor(self) -> None:
        """On a lake with a PostgreSQL catalog, hold this commit while a compactor holds the lease
        (storage/lease.py): its DELETEs would lose to our inserts. Checked on a cursor of its own,
        outside this transaction, whose Postgres reads would see a snapshot from its start."""
        if not self.leased:
            return
        if self._lease_cur is None:
            self._lease_cur = self._conn.cursor()
        wait_free(self._lease_cur, COMPACTION_LEASE)

    def reconnect(self) -> None:
        """Replace a connection DuckDB invalidated after a fatal error (the only way to write again
        in this process). Settings given to the constructor other than the checkpoint threshold
        are not re-applied: meant for a last write (closing a coverage span) before exiting."""
        with self._lock:
            try:
                self._conn.close()
            except duckdb.Error:
                pass  # closing an invalidated database may complain; it is released either way
            try:
                self._conn = self._connect(read_only=False)
                self._lease_cur = None
                if not self.lake:
                    self._conn.execute(f"SET checkpoint_threshold = '{CHECKPOINT_THRESHOLD}'")
            except duckdb.Error as exc:
                raise StorageError(f"cannot reopen {self.path}: {exc}") from exc

    # -- reads ----------------------------------------------------------------------------

    def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """A read under the write lock (it sees no half-done transaction of this process)."""
        with self._lock, storage_errors(self.path):
            return self._conn.execute(sql, list(params)).fetchall()

    @contextmanager
    def read(self) -> Iterator[Reader]:
        """A read cursor of its own, outside the write lock: long analytic reads (gap detection,
        status) and reads from other threads do not wait for the writer, nor make it wait."""
        with storage_errors(self.path):
            cur = self._cursor()
        try:
            yield Reader(cur, self.path)
        finally:
            try:
                cur.close()
            except duckdb.Error:
                pass  # the database was invalidated meanwhile; the cursor is gone either way


def conflict_pause(attempt: int) -> float:
    """Seconds to wait before retrying a conflicted transaction: growing, jittered."""
    return min(1.0, 0.01 * 2 ** attempt) * (0.5 + random.random())


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass  # a failed COMMIT already ended the transaction, or the database is invalidated


def failure_kind(exc: StorageError) -> str:
    """What kind of storage failure `exc` is, as a metric label.

    no_space      the filesystem is full (ENOSPC): writes work again once space returns
    io            another I/O error reading or writing the files
    invalidated   DuckDB invalidated the database after a fatal error (e.g. a checkpoint that
                  hit a full disk): nothing works on this connection any more
    other         anything else (out of memory, a constraint, a conversion)
    """
    cause = exc.__cause__
    text = str(exc)
    if isinstance(cause, duckdb.FatalException | duckdb.InternalException) or "database has been invalidated" in text:
        return "invalidated"
    if "No space left on device" in text or "Disk full" in text:
        return "no_space"
    if isinstance(cause, duckdb.IOException) or "Could not write file" in text or "Input/output error" in text:
        return "io"
    return "other"
