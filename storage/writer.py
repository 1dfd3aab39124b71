"""The one writer: every byte skyfill stores goes through `Store`.

DuckDB lets one process write a file. Inside that process `Store` serialises writes with a
lock, so the firehose batches, backfill reconciliations and queue updates never interleave
inside a transaction. Bulk rows go in as Arrow tables (`INSERT ... SELECT FROM arrow`), never
`executemany`.

Durability rule: `apply(batch)` commits the batch's effects AND its cursor in one
transaction, so after a crash the stored cursor never points past an effect that is lost.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from skyfill.errors import DatabaseLocked, StorageError

from skyfill.protocol.columns import RecordColumns

from .batch import Batch, Change, RecordChange, RepoChange, RepoRow
from .queries import COUNT_DESYNCHRONIZED_SQL, UNQUEUED_DESYNCHRONIZED_SQL
from .states import BackfillStatus, CoverageEnd, SyncState

__all__ = ["Store", "ReconcileCounts", "RecordColumns", "failure_kind", "open_store"]

_TS = pa.timestamp("us", tz="UTC")

_RECORD_SCHEMA = pa.schema(
    [
        ("did", pa.string()),
        ("collection", pa.string()),
        ("rkey", pa.string()),
        ("cid", pa.string()),
        ("rev", pa.string()),
        ("record", pa.string()),
        ("created_at", pa.string()),
    ]
)
_KEY_SCHEMA = pa.schema([("did", pa.string()), ("collection", pa.string()), ("rkey", pa.string())])
_REPO_SCHEMA = pa.schema(
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
_REPO_FIELDS = [f.name for f in _REPO_SCHEMA]
# Uncheckpointed rows stay in memory (DuckDB IN_MEMORY_TABLE ~ WAL size), so this trades RSS
# for fewer checkpoints: 64 MB measured ~4x less COMMIT time than 16 MB for ~35 MB more memory.
CHECKPOINT_THRESHOLD = "64MB"


@dataclass(frozen=True, slots=True)
class ReconcileCounts:
    added: int
    updated: int
    deleted: int
    unchanged: int


def _record_columns(batch: Batch) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
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
    dels: dict[str, list[Any]] = dict(zip(("did", "collection", "rkey"), _transpose(del_keys), strict=True))
    return puts, dels


def _transpose(keys: list[tuple[str, str, str]]) -> tuple[list[str], list[str], list[str]]:
    if not keys:
        return [], [], []
    did, collection, rkey = zip(*keys, strict=True)
    return list(did), list(collection), list(rkey)


def _arrow_table(columns: Mapping[str, list[Any]], schema: pa.Schema) -> pa.Table:
    """Columns -> Arrow on the system allocator. pyarrow's default (jemalloc) pool kept freed
    batch buffers resident: the firehose consumer peaked ~28 MB higher at the same speed."""
    pool = pa.system_memory_pool()
    return pa.Table.from_arrays([pa.array(columns[f.name], type=f.type, memory_pool=pool) for f in schema],
                                schema=schema)


def _now() -> datetime:
    return datetime.now(UTC)


def _ts_sql(col: str) -> str:
    # Event times and createdAt arrive as ISO strings; DuckDB parses them vectorised.
    return f"TRY_CAST({col} AS TIMESTAMPTZ)"


def _check_writable_dir(directory: Path) -> None:
    """Make sure DuckDB will be able to write beside the file: it creates `<db>.wal` there on the
    first commit, so a writable file in a read-only directory opens fine and fails only then."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise StorageError(f"cannot write in {str(directory) or '.'}: {exc.strerror or exc}") from exc


class Store:
    """The DuckDB file and the only code that writes to it."""

    def __init__(self, path: str | Path, *, read_only: bool = False, memory_limit: str | None = None) -> None:
        self.path = str(path)
        if self.path != ":memory:" and not read_only:
            _check_writable_dir(Path(self.path).parent)
        try:
            self._conn = duckdb.connect(self.path, read_only=read_only)
        except duckdb.Error as exc:
            if isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower():
                raise DatabaseLocked(f"{self.path} is held by another process: {exc}") from exc
            raise StorageError(f"cannot open {self.path}: {exc}") from exc
        self._lock = threading.RLock()
        self.read_only = read_only
        try:
            if not read_only:
                schema = resources.files("storage").joinpath("schema.sql").read_text()
                self._conn.execute(schema)
                # DuckDB checkpoints when the WAL passes 16 MB by default, and a checkpoint's cost grows
                # with the table: on 200k firehose frames COMMIT was over half of Store.apply. Durability
                # is unchanged (every COMMIT still syncs the WAL); a crash means a longer WAL replay.
                self._conn.execute(f"SET checkpoint_threshold = '{CHECKPOINT_THRESHOLD}'")
            if memory_limit is not None:
                # DuckDB's buffer pool defaults to 80% of RAM. The primary-key index must fit inside
                # the limit, so it has to grow with the mirror (100MB holds ~200k records' index).
                try:
                    self._conn.execute("SET memory_limit = ?", [memory_limit])
                except duckdb.Error as exc:
                    raise StorageError(f"bad memory limit {memory_limit!r}: {exc}") from exc
        except BaseException as exc:
            self._conn.close()
            if isinstance(exc, duckdb.Error):  # e.g. a file truncated under its own header
                raise StorageError(f"cannot open {self.path}: {exc}") from exc
            raise

    # -- plumbing -----------------------------------------------------------------------

    @property
    def conn(self) -> duckdb.DuckDBPyConnection:
        """The raw connection, for reads. Writers must use the methods of this class."""
        return self._conn

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor on the same database, for reads from another thread."""
        with _storage_errors():
            return self._conn.cursor()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _txn(self, body: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        """Run `body` in one transaction. Every DuckDB failure, COMMIT's included (a full disk
        fails there: the WAL is written at COMMIT), leaves as StorageError with nothing stored."""
        with self._lock:
            con = self._conn
            try:
                con.execute("BEGIN TRANSACTION")
            except duckdb.Error as exc:
                raise StorageError(str(exc)) from exc
            try:
                result = body(con)
                con.execute("COMMIT")
            except BaseException as exc:
                _rollback(con)
                if isinstance(exc, duckdb.Error):
                    raise StorageError(str(exc)) from exc
                raise
            return result

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
                self._conn = duckdb.connect(self.path)
                self._conn.execute(f"SET checkpoint_threshold = '{CHECKPOINT_THRESHOLD}'")
            except duckdb.Error as exc:
                raise StorageError(f"cannot reopen {self.path}: {exc}") from exc

    def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock, _storage_errors():
            return self._conn.execute(sql, list(params)).fetchall()

    # -- firehose batches ---------------------------------------------------------------

    def apply(self, batch: Batch) -> None:
        """Commit a batch's effects and its cursor atomically."""
        if batch.is_empty() and batch.coverage is None:
            return
        now = _now()
        puts_cols, del_cols = _record_columns(batch)
        self._txn(lambda con: self._apply_in(con, batch, now, puts_cols, del_cols))

    def _apply_in(
        self,
        con: duckdb.DuckDBPyConnection,
        batch: Batch,
        now: datetime,
        puts_cols: dict[str, list[Any]],
        del_cols: dict[str, list[Any]],
    ) -> None:
        if batch.purged_dids:
            con.register("_purged", pa.table({"did": sorted(batch.purged_dids)}))
            con.execute("DELETE FROM records WHERE did IN (SELECT did FROM _purged)")
            con.unregister("_purged")
        if del_cols["did"]:
            con.register("_dels", _arrow_table(del_cols, _KEY_SCHEMA))
            con.execute(
                "DELETE FROM records r USING _dels d "
                "WHERE r.did = d.did AND r.collection = d.collection AND r.rkey = d.rkey"
            )
            con.unregister("_dels")
        if puts_cols["did"]:
            self._upsert_records(con, _arrow_table(puts_cols, _RECORD_SCHEMA), now)
        if batch.repos:
            self._upsert_repos(con, batch.repos.values())
        if batch.cursor is not None:
            source, seq = batch.cursor
            con.execute(
                "INSERT INTO cursors VALUES (?, ?, ?) ON CONFLICT (source) DO UPDATE "
                "SET seq = excluded.seq, updated_at = excluded.updated_at",
                [source, seq, now],
            )
        if batch.coverage is not None:
            c = batch.coverage
            con.execute(
                "UPDATE coverage SET first_seq = coalesce(first_seq, ?), last_seq = ?, "
                f"first_event_at = coalesce(first_event_at, {_ts_sql('?::VARCHAR')}), "
                f"last_event_at = coalesce({_ts_sql('?::VARCHAR')}, last_event_at) WHERE id = ?",
                [c.first_seq, c.last_seq, c.first_event_at, c.last_event_at, c.id],
            )

    @staticmethod
    def _upsert_records(
        con: duckdb.DuckDBPyConnection, table: pa.Table, now: datetime, *, insert_only: bool = False
    ) -> None:
        # insert_only: the caller knows no key exists yet (a plain INSERT is ~35% cheaper)
        upsert = "" if insert_only else (
            " ON CONFLICT (did, collection, rkey) DO UPDATE SET cid = excluded.cid, rev = excluded.rev, "
            "record = excluded.record, created_at = excluded.created_at, indexed_at = excluded.indexed_at"
        )
        con.register("_puts", table)
        con.execute(
            "INSERT INTO records "
            f"SELECT did, collection, rkey, cid, rev, record::JSON, {_ts_sql('created_at')}, ? FROM _puts" + upsert,
            [now],
        )
        con.unregister("_puts")

    @staticmethod
    def _upsert_repos(con: duckdb.DuckDBPyConnection, rows: Iterable[RepoRow]) -> None:
        now = _now()
        cols: dict[str, list[Any]] = {name: [] for name in _REPO_FIELDS}
        for row in rows:
            for name in _REPO_FIELDS:
                cols[name].append(getattr(row, name))
        cols["first_seen_at"] = [v or now for v in cols["first_seen_at"]]
        con.register("_repos", _arrow_table(cols, _REPO_SCHEMA))
        updates = ", ".join(f"{n} = excluded.{n}" for n in _REPO_FIELDS[1:] if n != "first_seen_at")
        select = ", ".join(_ts_sql(n) if n == "last_event_at" else n for n in _REPO_FIELDS)
        con.execute(
            f"INSERT INTO repos ({', '.join(_REPO_FIELDS)}) SELECT {select} FROM _repos "
            f"ON CONFLICT (did) DO UPDATE SET {updates}"
        )
        con.unregister("_repos")

    # -- cursor, coverage, per-DID state at start-up ---------------------------------------

    def load_cursor(self, source: str) -> int | None:
        rows = self.fetchall("SELECT seq FROM cursors WHERE source = ?", [source])
        return rows[0][0] if rows else None

    def start_coverage(self, source: str) -> int:
        """Open a coverage span for a new consumer run; spans left 'running' by a crash are closed."""

        def body(con: duckdb.DuckDBPyConnection) -> int:
            con.execute(
                "UPDATE coverage SET ended = ?, stopped_at = coalesce(last_event_at, started_at) "
                "WHERE source = ? AND ended = ?",
                [CoverageEnd.CRASHED.value, source, CoverageEnd.RUNNING.value],
            )
            row = con.execute(
                "INSERT INTO coverage (source, started_at) VALUES (?, ?) RETURNING id", [source, _now()]
            ).fetchall()
            return int(row[0][0])

        return int(self._txn(body))

    def end_coverage(self, span_id: int, ended: CoverageEnd) -> None:
        self._txn(
            lambda con: con.execute(
                "UPDATE coverage SET ended = ?, stopped_at = ? WHERE id = ?", [ended.value, _now(), span_id]
            )
        )

    def load_repos(self) -> dict[str, RepoRow]:
        """Every DID's firehose-owned state, for the in-memory tracker at start-up."""
        with self._lock, _storage_errors():
            table = self._conn.execute(
                "SELECT did, rev, data_cid, commit_cid, last_seq, CAST(last_event_at AS VARCHAR), "
                "handle, active, status, sync_state, desync_reason, desynced_at, first_seen_at FROM repos"
            ).fetchall()
        return {row[0]: RepoRow(*row) for row in table}

    # -- backfill -------------------------------------------------------------------------

    def reconcile(
        self,
        did: str,
        *,
        rev: str | None,
        data_cid: str,
        commit_cid: str,
        fetched: Mapping[tuple[str, str], str] | Callable[[], Mapping[tuple[str, str], str]],
        materialize: Callable[[list[tuple[str, str]]], RecordColumns],
        after: Batch | None = None,
        emit: Callable[[list[Change]], None] | None = None,
        snapshot: bool = False,
        trust_data_root: bool = True,
    ) -> ReconcileCounts:
        """Make the stored records of `did` equal the fetched repo, in one transaction.

        `fetched` maps (collection, rkey) -> CID for every record of the verified repo.
        `materialize(keys)` decodes only the records that are missing or changed, so an
        unchanged repo costs a CID comparison per record and no record decoding.
        `after` (firehose effects newer than the fetched rev, captured while the repo was being
        fetched) is applied in the same transaction, so the result is never older than what the
        firehose had already stored.

        `emit(changes)` (publishing) is called INSIDE the transaction, after every write and
        before COMMIT: if it raises, nothing is stored, so the mirror never holds a reconcile
        the topics lack. It receives `source: "backfill"` record changes, then one repo change
        (`kind: "backfill"`, the row as this transaction leaves it). Without `snapshot` they
        are the diff against the stored records (keys that `after` rewrites are left out: the
        firehose already published their newer state); with `snapshot` every fetched record
        is sent and the repo change says so, for subscribers that never saw this store's copy.

        Unchanged fast path (`trust_data_root`): when the stored row already has this `data_cid`,
        is synchronized, its last backfill is ok and the account is active, the stored records
        ARE the MST under that root (it commits to every key and CID), so `fetched` is never
        called/read and no record is compared; only the bookkeeping (and `after`) is written.
        `fetched` may be a callable so that a caller can defer walking the MST until needed.
        Callers whose stored records may differ from the repo under an equal root (a firehose
        that drops collections) must pass trust_data_root=False.
        """
        now = _now()

        def body(con: duckdb.DuckDBPyConnection) -> ReconcileCounts:
            if trust_data_root and not (emit is not None and snapshot) and _same_root(con, did, data_cid):
                # no stored records under a trusted root: an empty repo, or a purged account that
                # came back (the purge leaves the row synchronized); the full path is cheap then
                stored = int(con.execute("SELECT count(*) FROM records WHERE did = ?", [did]).fetchall()[0][0])
                if stored:
                    return _reconcile_unchanged(con, did, rev, stored, now, after, emit)
            return _reconcile_full(con, fetched() if callable(fetched) else fetched)

        def _reconcile_unchanged(
            con: duckdb.DuckDBPyConnection, did: str, rev: str | None, stored: int,
            now: datetime, after: Batch | None, emit: Callable[[list[Change]], None] | None,
        ) -> ReconcileCounts:
            _finish(con)
            if emit is not None:
                emit(_backfill_changes(con, did, rev, now, {}, None, (), skip=set(), snapshot=False))
            return ReconcileCounts(added=0, updated=0, deleted=0, unchanged=stored)

        def _finish(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(
                "INSERT INTO repos (did, rev, data_cid, commit_cid, sync_state, first_seen_at, "
                "backfill_status, backfill_attempts, backfilled_at, backfilled_rev) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?) ON CONFLICT (did) DO UPDATE SET "
                "rev = excluded.rev, data_cid = excluded.data_cid, commit_cid = excluded.commit_cid, "
                "sync_state = excluded.sync_state, desync_reason = NULL, desynced_at = NULL, "
                "backfill_status = excluded.backfill_status, backfill_error = NULL, backfill_attempts = 0, "
                "backfill_retry_after = NULL, backfilled_at = excluded.backfilled_at, "
                "backfilled_rev = excluded.backfilled_rev",
                [did, rev, data_cid, commit_cid, SyncState.SYNCHRONIZED.value, now,
                 BackfillStatus.OK.value, now, rev],
            )
            con.execute(
                "UPDATE backfill_queue SET state = 'done', error = NULL, updated_at = ? WHERE did = ?", [now, did]
            )
            if after is not None:
                puts_cols, del_cols = _record_columns(after)
                self._apply_in(con, after, now, puts_cols, del_cols)

        def _reconcile_full(
            con: duckdb.DuckDBPyConnection, fetched: Mapping[tuple[str, str], str]
        ) -> ReconcileCounts:
            existing = dict(
                ((c, k), cid)
                for c, k, cid in con.execute(
                    "SELECT collection, rkey, cid FROM records WHERE did = ?", [did]
                ).fetchall()
            )
            changed = [key for key, cid in fetched.items() if existing.get(key) != cid]
            gone = [key for key in existing if key not in fetched]
            added = sum(1 for key in changed if key not in existing)
            # snapshot: decode every record once (to publish it), write only the changed ones
            every = materialize(list(fetched)) if emit is not None and snapshot else None
            if gone:
                dels = pa.table(
                    {"did": [did] * len(gone), "collection": [k[0] for k in gone], "rkey": [k[1] for k in gone]},
                    schema=_KEY_SCHEMA,
                )
                con.register("_dels", dels)
                con.execute(
                    "DELETE FROM records r USING _dels d "
                    "WHERE r.did = d.did AND r.collection = d.collection AND r.rkey = d.rkey"
                )
                con.unregister("_dels")
            kept: list[RecordColumns] = []
            # Chunks bound the decoded JSON and Arrow copies held at once; all in this transaction.
            for lo in range(0, len(changed), RECONCILE_CHUNK):
                part = changed[lo : lo + RECONCILE_CHUNK]
                cols = _subset(every, set(part)) if every is not None else materialize(part)
                n = len(cols.collection)
                table = pa.table(
                    {
                        "did": [did] * n,
                        "collection": cols.collection,
                        "rkey": cols.rkey,
                        "cid": cols.cid,
                        "rev": [rev] * n,
                        "record": cols.record,
                        "created_at": cols.created_at,
                    },
                    schema=_RECORD_SCHEMA,
                )
                # `existing` is every stored key of the DID, read in this transaction
                self._upsert_records(con, table, now, insert_only=not existing)
                del table
                if emit is not None and every is None:
                    kept.append(cols)
                del cols
            _finish(con)
            if emit is not None:
                sent = every if every is not None else (RecordColumns.concat(kept) if changed else None)
                emit(_backfill_changes(con, did, rev, now, existing, sent, gone,
                                       skip={(c, k) for d, c, k in (after.records if after else ()) if d == did},
                                       snapshot=snapshot))
            return ReconcileCounts(
                added=added, updated=len(changed) - added, deleted=len(gone),
                unchanged=len(fetched) - len(changed),
            )

        return self._txn(body)  # type: ignore[no-any-return]

    def trusted_root(self, did: str) -> str | None:
        """The stored data root under which `reconcile` would skip the diff (None: it would not).

        A hint read on its own cursor, outside the write lock: reconcile re-checks it.
        """
        with _storage_errors():
            cur = self._conn.cursor()
            try:
                rows = cur.execute(f"SELECT data_cid FROM repos WHERE did = ? AND {_SAME_ROOT}",
                                   [did, *_SAME_ROOT_ARGS]).fetchall()
            finally:
                cur.close()
        return rows[0][0] if rows else None

    def stored_cids(self, did: str) -> dict[tuple[str, str], str]:
        """(collection, rkey) -> CID of the stored records of `did`, read outside the write lock."""
        with _storage_errors():
            cur = self._conn.cursor()
            try:
                rows = cur.execute("SELECT collection, rkey, cid FROM records WHERE did = ?", [did]).fetchall()
            finally:
                cur.close()
        return {(c, k): cid for c, k, cid in rows}

    def count_desynchronized(self) -> int:
        """How many DIDs have a broken chain, read on its own cursor outside the write lock."""
        with _storage_errors():
            cur = self._conn.cursor()
            try:
                return int(cur.execute(COUNT_DESYNCHRONIZED_SQL).fetchall()[0][0])
            finally:
                cur.close()

    def unqueued_desynchronized(self) -> list[str]:
        """Active DIDs with a broken chain that are not pending or in progress in the backfill queue."""
        return [did for (did,) in self.fetchall(UNQUEUED_DESYNCHRONIZED_SQL)]

    def record_backfill_failure(
        self, did: str, *, status: BackfillStatus, error: str, retry_after: datetime | None
    ) -> None:
        """Record a failed backfill on the repo row (and its queue entry); never marks it done."""
        now = _now()
        terminal = retry_after is None
        queue_state = "failed" if terminal else "pending"

        def body(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(
                "INSERT INTO repos (did, first_seen_at, backfill_status, backfill_error, backfill_attempts, "
                "backfill_retry_after) VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT (did) DO UPDATE SET "
                "backfill_status = excluded.backfill_status, backfill_error = excluded.backfill_error, "
                "backfill_attempts = repos.backfill_attempts + 1, backfill_retry_after = excluded.backfill_retry_after",
                [did, now, status.value, error, retry_after],
            )
            con.execute(
                "UPDATE backfill_queue SET state = ?, attempts = attempts + 1, retry_after = ?, error = ?, "
                "updated_at = ? WHERE did = ?",
                [queue_state, retry_after, error, now, did],
            )

        self._txn(body)

    def enqueue(self, reasons_by_did: Mapping[str, Iterable[str]]) -> int:
        """Add DIDs to the backfill queue; a DID already pending gains the new reasons. Returns new rows."""
        if not reasons_by_did:
            return 0
        now = _now()
        table = pa.table(
            {
                "did": list(reasons_by_did),
                "reasons": [sorted(set(r)) for r in reasons_by_did.values()],
            },
            schema=pa.schema([("did", pa.string()), ("reasons", pa.list_(pa.string()))]),
        )

        def body(con: duckdb.DuckDBPyConnection) -> int:
            con.register("_q", table)
            before = con.execute("SELECT count(*) FROM backfill_queue WHERE state IN ('pending','in_progress')").fetchall()[0][0]
            con.execute(
                "INSERT INTO backfill_queue (did, reasons, enqueued_at, state, updated_at) "
                "SELECT did, reasons, ?, 'pending', ? FROM _q ON CONFLICT (did) DO UPDATE SET "
                "reasons = list_sort(list_distinct(list_concat("
                "  CASE WHEN backfill_queue.state IN ('pending','in_progress') THEN backfill_queue.reasons ELSE [] END,"
                "  excluded.reasons))), "
                "state = CASE WHEN backfill_queue.state = 'in_progress' THEN 'in_progress' ELSE 'pending' END, "
                "enqueued_at = CASE WHEN backfill_queue.state IN ('pending','in_progress') "
                "  THEN backfill_queue.enqueued_at ELSE excluded.enqueued_at END, "
                "attempts = CASE WHEN backfill_queue.state IN ('pending','in_progress') "
                "  THEN backfill_queue.attempts ELSE 0 END, "
                "updated_at = excluded.updated_at",
                [now, now],
            )
            con.unregister("_q")
            after = con.execute("SELECT count(*) FROM backfill_queue WHERE state IN ('pending','in_progress')").fetchall()[0][0]
            return int(after - before)

        return int(self._txn(body))

    def execute_write(self, sql: str, params: Iterable[Any] = ()) -> None:
        """A one-statement write (identity cache, queue state) in its own transaction."""
        self._txn(lambda con: con.execute(sql, list(params)))

    def write_arrow(self, sql: str, name: str, table: pa.Table, params: Iterable[Any] = ()) -> None:
        """A bulk write from an Arrow table registered as `name`, in its own transaction."""

        def body(con: duckdb.DuckDBPyConnection) -> None:
            con.register(name, table)
            try:
                con.execute(sql, list(params))
            finally:
                con.unregister(name)

        self._txn(body)


@contextmanager
def _storage_errors() -> Iterator[None]:
    """A DuckDB failure of a read leaves a public Store method as StorageError, like a write's."""
    try:
        yield
    except duckdb.Error as exc:
        raise StorageError(str(exc)) from exc


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


# The stored records of a repo row matching this are exactly the MST under its data_cid.
_SAME_ROOT = "sync_state = ? AND backfill_status = ? AND active IS NOT FALSE AND coalesce(status, 'active') = 'active'"
_SAME_ROOT_ARGS = (SyncState.SYNCHRONIZED.value, BackfillStatus.OK.value)


def _same_root(con: duckdb.DuckDBPyConnection, did: str, data_cid: str) -> bool:
    """The stored records of `did` are exactly the repo under `data_cid` (see `Store.reconcile`)."""
    rows = con.execute(
        f"SELECT 1 FROM repos WHERE did = ? AND data_cid = ? AND {_SAME_ROOT}", [did, data_cid, *_SAME_ROOT_ARGS]
    ).fetchall()
    return bool(rows)


# reconcile writes (and asks `materialize` for) at most this many records at a time
RECONCILE_CHUNK = 50_000


def _subset(cols: RecordColumns, keys: set[tuple[str, str]]) -> RecordColumns:
    return RecordColumns.gather(
        [(cols, i) for i, key in enumerate(zip(cols.collection, cols.rkey, strict=True)) if key in keys]
    )


def _backfill_changes(
    con: duckdb.DuckDBPyConnection,
    did: str,
    rev: str | None,
    now: datetime,
    existing: Mapping[tuple[str, str], str],
    puts: RecordColumns | None,
    gone: Iterable[tuple[str, str]],
    *,
    skip: set[tuple[str, str]],
    snapshot: bool,
) -> list[Change]:
    """What a reconciliation changed, as `source: "backfill"` changes (see `Store.reconcile`)."""
    at = now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    out: list[Change] = []
    if puts is not None:
        for collection, rkey, cid, record in zip(puts.collection, puts.rkey, puts.cid, puts.record, strict=True):
            if (collection, rkey) in skip:
                continue
            op = "update" if (collection, rkey) in existing else "create"
            out.append(RecordChange(did=did, collection=collection, rkey=rkey, op=op, cid=cid, rev=rev,
                                    seq=None, time=at, record=record, source="backfill"))
    for collection, rkey in gone:
        if (collection, rkey) not in skip:
            out.append(RecordChange(did=did, collection=collection, rkey=rkey, op="delete", cid=None, rev=rev,
                                    seq=None, time=at, record=None, source="backfill"))
    row = con.execute(
        "SELECT rev, data_cid, active, status, handle, sync_state, desync_reason FROM repos WHERE did = ?", [did]
    ).fetchall()[0]
    out.append(RepoChange(did=did, kind="backfill", rev=row[0], data_cid=row[1], active=bool(row[2]),
                          status=row[3], handle=row[4], sync_state=row[5], desync_reason=row[6],
                          seq=None, time=at, source="backfill", snapshot=snapshot))
    return out


def open_store(path: str | Path, *, read_only: bool = False) -> Store:
    return Store(path, read_only=read_only)
