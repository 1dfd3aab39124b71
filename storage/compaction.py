"""Compaction: fold the version logs into the deduplicated bases, beside the writers.

Every write appends to a log (storage/records.py, storage/repos.py, storage/refs.py), so the
logs grow until a compaction folds them into the bases; the views stay correct at any log size, they only get
slower as it grows. `Store` counts the rows in the logs (at open, then as it appends) and, past
`COMPACT_AFTER_ROWS`, starts one compaction in a background thread at its next write. The
compaction runs on its own cursor and transaction, NOT under the write lock: writers keep
appending meanwhile (they never delete, and only compaction does, so the two never conflict),
and it folds only versions committed when it started (v <= upto_v). A failed compaction changes
nothing (one transaction): it is logged, counted, and retried after the next
`COMPACT_AFTER_ROWS` appends. `compact()` runs one in the caller's thread.

On a lake (storage/lake.py) many processes append, and DuckLake fails a DELETE at COMMIT when another
transaction inserted into the table meanwhile. So a lake compaction first takes the lake's compaction
lease (storage/lease.py): one compactor in the whole lake, and every writer holds its next commit
while the lease is held (at most until it expires: a killed compactor stalls nobody for longer). A
background compaction that finds the lease taken skips (another process compacts the same logs); an
explicit `compact()` waits for it. A lake compaction also prunes the rows that newer ones superseded
in the small keyed tables writers append to (`_PRUNE`: cursors, identities, the sink's marks).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, TypeVar

import duckdb

from skyfill import metrics
from skyfill.errors import StorageError

from .base import CONFLICT_RETRIES, COMPACTION_LEASE, StoreBase, conflict_pause, now_utc, storage_errors
from .lake import is_conflict, on_lake
from .lake_files import LakeUpkeep, upkeep
from .lease import SETTLE, Lease
from . import queue_log, refs, repos
from .records import RecordCompaction, compact_records

__all__ = ["Compacting", "Compaction", "COMPACT_AFTER_ROWS", "DELETES_KEPT", "LEASE_SECONDS", "LakeUpkeep"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rows appended (record versions, deletions, purges) after which a compaction starts. The views
# anti-join the log: at 250k rows that costs a few ms per query; a compaction of a 100M-record
# base costs seconds of CPU, so this keeps it to a small share of a busy firehose's time.
COMPACT_AFTER_ROWS: Final = 250_000

# On a lake a compaction keeps the deletion rows of this last while in the log (records.py
# `compact_records`): longer than any writer's transaction, its wait for a compaction's lease included.
DELETES_KEPT: Final = timedelta(minutes=15)

# The compaction lease's term; a live compactor renews it every third of it (storage/lease.py).
LEASE_SECONDS: Final = 30.0

# The lake's small keyed tables (appended: storage/lake.py `upsert`) -> (key columns, what "newest" is)
_PRUNE: Final = {
    "cursors": ("source", "updated_at"),
    "identities": ("did", "resolved_at"),
    "sink_tombstones": ("did, collection, rkey", "rev"),
    "sink_snapshots": ("did", "rev"),
}

_LOG_MAX_V = """
SELECT coalesce(max(v), 0) FROM (
    SELECT max(v) AS v FROM record_log UNION ALL SELECT max(v) FROM record_purges
    UNION ALL SELECT max(v) FROM repo_log UNION ALL SELECT max(v) FROM ref_log UNION ALL SELECT max(v) FROM queue_log
)
"""


_LOG_ROWS = """
SELECT (SELECT count(*) FROM record_log) + (SELECT count(*) FROM record_purges) + (SELECT count(*) FROM repo_log)
     + (SELECT count(*) FROM queue_log)
"""


@dataclass(frozen=True, slots=True)
class Compaction:
    records: RecordCompaction | None   # None: nothing to fold
    repos: int = 0                     # DIDs whose repo_base row was rewritten
    queue: int = 0                     # DIDs whose queue_base row was rewritten
    pruned: int = 0                    # superseded rows of the lake's small keyed tables removed
    skipped: bool = False              # the lake's lease was held by another compactor: nothing done


class Compacting(StoreBase):
    """Store methods that fold the logs into the bases (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._compact_lock = threading.Lock()
        self._compactor: threading.Thread | None = None
        self.lease_seconds = LEASE_SECONDS
        # what earlier processes left in the logs counts too: a file written by many short
        # processes (backfills, sinks) is compacted by the first write past the threshold
        self._appended = 0 if self.read_only else int(self.fetchall(_LOG_ROWS)[0][0])

    def close(self) -> None:
        self.wait_compaction()
        super().close()

    def compact(self, *, full: bool = False) -> Compaction:
        """Fold every committed log row into the bases, now, in this thread.

        Each compaction appends its rows to the base sorted among themselves, so a DID's rows
        spread over one run of row groups per compaction and `WHERE did = ?` reads more of them
        as compactions accumulate. `full` also rewrites the whole base in key order (minutes
        at 10^8 records, twice the base's disk space meanwhile; writers are not held up)."""
        if self.lake:
            return self._compact_lake(full=full)
        with self._compact_lock, storage_errors(self.path):
            cur = self._cursor()
            try:
                return self._compact_on(cur, full=full)
            finally:
                cur.close()

    def _compact_lake(self, *, full: bool, wait: bool = True) -> Compaction:
        """A compaction under the lake's compaction lease (module docstring); None: skipped."""
        done = self._leased(lambda cur: self._compact_on(cur, full=full), wait=wait)
        if done is None:
            log.info("compaction skipped: another process holds the lake's compaction lease")
            return Compaction(records=None, skipped=True)
        return done

    def upkeep_lake(self, *, retention_seconds: float) -> LakeUpkeep:
        """DuckLake's file upkeep (storage/lake_files.py) under the compaction lease: merging files
        rewrites them, which conflicts with appends like a compaction's DELETEs."""
        if not self.lake:
            raise StorageError(f"{self.path} is not a lake: file upkeep is DuckLake's")
        done = self._leased(lambda cur: upkeep(cur, retention_seconds=retention_seconds), wait=True)
        if done is None:  # not reached: it waits for the lease
            raise StorageError("the lake's compaction lease was not taken")
        return done

    def _leased(self, work: Callable[[duckdb.DuckDBPyConnection], T], *, wait: bool) -> T | None:
        """`work` on a cursor of its own, holding the lake's compaction lease (None: it was taken and
        not `wait`). Work that still lost a conflict (a commit that slipped past its lease check)
        is run again, now with every writer held."""
        with self._compact_lock:
            if not self.leased:  # a DuckDB/SQLite catalog: one writer process, this one
                with self._lock:
                    return self._retrying(work)
            with storage_errors(self.path):
                lease = Lease(self._conn, COMPACTION_LEASE, seconds=self.lease_seconds)
                if not lease.acquire(timeout=None if wait else 0):
                    return None
            try:
                time.sleep(SETTLE)
                return self._retrying(work)
            finally:
                with storage_errors(self.path):
                    lease.release()

    def _retrying(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        attempt = 0
        while True:
            with storage_errors(self.path):
                cur = self._cursor()
                try:
                    return work(cur)
                except duckdb.Error as exc:
                    if not is_conflict(exc) or attempt >= CONFLICT_RETRIES:
                        raise
                finally:
                    cur.close()
            metrics.STORE_TXN_RETRIES.inc()
            time.sleep(conflict_pause(attempt))
            attempt += 1

    def _compact_on(self, cur: duckdb.DuckDBPyConnection, *, full: bool) -> Compaction:
        started = time.perf_counter()
        cur.execute("BEGIN TRANSACTION")
        try:
            upto = int(cur.execute(_LOG_MAX_V).fetchall()[0][0])
            keep = now_utc() - DELETES_KEPT if on_lake(cur) else None  # a file has no writer in flight
            result = compact_records(cur, upto, keep_deletes_since=keep) if upto else None
            repo_rows = repos.compact(cur, upto) if upto else 0
            ref_pairs = refs.compact(cur, upto) if upto else 0
            queue_rows = queue_log.compact(cur, upto) if upto else 0
            pruned = _prune(cur) if on_lake(cur) else 0  # a file's primary keys keep one row per key
            if full:
                repos.resort(cur)
                refs.resort(cur)
                cur.execute("CREATE OR REPLACE TEMP TABLE _record_sorted AS SELECT * FROM record_base")
                try:
                    cur.execute("DELETE FROM record_base")
                    cur.execute("INSERT INTO record_base SELECT * FROM _record_sorted ORDER BY did, collection, rkey")
                finally:
                    cur.execute("DROP TABLE IF EXISTS _record_sorted")
            cur.execute("COMMIT")
        except BaseException:
            try:
                cur.execute("ROLLBACK")
            except duckdb.Error:
                pass  # a failed COMMIT already ended the transaction
            raise
        if (result is not None and result.log_rows + result.purges + repo_rows + queue_rows) or pruned:
            metrics.STORE_COMPACTIONS.labels("ok").inc()
            metrics.STORE_COMPACTION_SECONDS.observe(time.perf_counter() - started)
            folded = {} if result is None else {
                "log_rows": result.log_rows, "purges": result.purges, "base_deleted": result.base_deleted,
                "base_inserted": result.base_inserted}
            log.info("compacted the version logs", extra={"ctx": {
                **folded, "repos": repo_rows, "ref_pairs": ref_pairs, "queue": queue_rows, "pruned": pruned,
                "full": full, "seconds": round(time.perf_counter() - started, 3)}})
        return Compaction(records=result, repos=repo_rows, queue=queue_rows, pruned=pruned)

    def _note_appended(self, rows: int) -> None:
        """Count appended log rows; start a background compaction past the threshold."""
        self._appended += rows
        if self._appended < COMPACT_AFTER_ROWS or self.read_only:
            return
        if self._compactor is not None and self._compactor.is_alive():
            return
        self._appended = 0
        self._compactor = threading.Thread(target=self._compact_in_background, name="skyfill-compact", daemon=True)
        self._compactor.start()

    def _compact_in_background(self) -> None:
        try:
            if self.lake:
                self._compact_lake(full=False, wait=False)
            else:
                self.compact()
        except StorageError as exc:
            metrics.STORE_COMPACTIONS.labels("failed").inc()
            log.error("compaction failed; the logs are kept and it is retried later",
                      extra={"ctx": {"error": str(exc)}})

    def wait_compaction(self) -> None:
        """Wait for a background compaction to end (close() does)."""
        worker = self._compactor
        if worker is not None:
            worker.join()


def _prune(cur: duckdb.DuckDBPyConnection) -> int:
    """Keep only each key's newest row in the lake's small keyed tables; the rows removed."""
    present = {name for (name,) in cur.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()}
    removed = 0
    for table, (keys, newest) in _PRUNE.items():
        if table not in present:
            continue  # the sink's tables exist once a sink has started
        cur.execute(f"CREATE OR REPLACE TEMP TABLE _prune_keep AS SELECT * FROM {table} SEMI JOIN "
                    f"(SELECT {keys} FROM {table} GROUP BY ALL HAVING count(*) > 1) USING ({keys}) "
                    f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {newest} DESC NULLS LAST) = 1")
        try:
            kept = int(cur.execute("SELECT count(*) FROM _prune_keep").fetchall()[0][0])
            if not kept:
                continue
            total = int(cur.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])
            match = " AND ".join(f"{table}.{k} = _k.{k}" for k in keys.split(", "))
            cur.execute(f"DELETE FROM {table} USING _prune_keep _k WHERE {match}")
            cur.execute(f"INSERT INTO {table} SELECT * FROM _prune_keep")
            removed += total - int(cur.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])
        finally:
            cur.execute("DROP TABLE IF EXISTS _prune_keep")
    return removed
