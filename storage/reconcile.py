"""Reconcile: make the stored records of one DID equal a fetched, verified repo, in one transaction.

The backfiller (standalone) and the daemon's resync both end here. See `Reconciling.reconcile`
for the rules: the diff, the unchanged fast path under a trusted data root, the firehose
effects captured meanwhile (`after`) and publishing inside the transaction (`emit`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import duckdb
import pyarrow as pa

from skyfill import metrics
from skyfill.protocol.columns import RecordColumns

from . import repos
from .base import now_utc
from .batch import Batch, Change, RecordChange, RepoChange
from .firehose import DELETE_SCHEMA, RECORD_SCHEMA, FirehoseWrites, record_columns
from .queue import mark_backfilled
from .records import COUNT_STORED_SQL, STORED_CIDS_SQL, append_deletes, append_puts, next_version
from .states import BackfillStatus, SyncState

__all__ = ["Reconciling", "ReconcileCounts", "ReconcileItem", "RECONCILE_CHUNK"]

# reconcile writes (and asks `materialize` for) at most this many records at a time
RECONCILE_CHUNK = 50_000

@dataclass(frozen=True, slots=True)
class ReconcileCounts:
    added: int
    updated: int
    deleted: int
    unchanged: int


# puts of fewer rows than this are gathered over a `reconcile_many` batch into one append
_DEFER_ROWS = 5_000


@dataclass(slots=True)
class ReconcileItem:
    """The arguments of one `Store.reconcile` (see there), for `Store.reconcile_many`."""

    did: str
    rev: str | None
    data_cid: str
    commit_cid: str
    fetched: Mapping[tuple[str, str], str] | Callable[[], Mapping[tuple[str, str], str]]
    materialize: Callable[[list[tuple[str, str]]], RecordColumns]
    after: Batch | None = None
    emit: Callable[[list[Change]], None] | None = None
    snapshot: bool = False
    trust_data_root: bool = True
    run: str | None = None
    backfill_filter: str | None = None


@dataclass(slots=True)
class _Puts:
    """Record puts of one transaction: small ones gathered and appended as one table."""

    now: datetime
    tables: list[pa.Table] = field(default_factory=list)
    rows: int = 0

    def add(self, con: duckdb.DuckDBPyConnection, v: int, table: pa.Table, *, defer: bool) -> None:
        if not defer or table.num_rows >= _DEFER_ROWS:
            append_puts(con, v, table, self.now)
            return
        self.tables.append(table)
        self.rows += table.num_rows
        if self.rows >= RECONCILE_CHUNK:
            self.flush(con)

    def flush(self, con: duckdb.DuckDBPyConnection) -> None:
        """Append the gathered puts under a new version (their DIDs are distinct: no key repeats)."""
        if self.tables:
            table = pa.concat_tables(self.tables)
            self.tables, self.rows = [], 0
            append_puts(con, next_version(con), table, self.now)


class Reconciling(FirehoseWrites):
    """Store methods of the reconcile, and the reads that let a caller prepare one outside the lock."""

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
        run: str | None = None,
        backfill_filter: str | None = None,
    ) -> ReconcileCounts:
        """Make the stored records of `did` equal the fetched repo, in one transaction.

        `backfill_filter` (a canonical collections filter): recorded in `backfill_filters` in
        the same transaction, so the filter and the records it selected are never apart.

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
        item = ReconcileItem(did, rev=rev, data_cid=data_cid, commit_cid=commit_cid, fetched=fetched,
                             materialize=materialize, after=after, emit=emit, snapshot=snapshot,
                             trust_data_root=trust_data_root, run=run, backfill_filter=backfill_filter)
        return self.reconcile_many([item])[0]

    def reconcile_many(self, items: Sequence[ReconcileItem]) -> list[ReconcileCounts]:
        """`reconcile` of several DIDs in ONE transaction: all are stored, or (on any error) none.

        Each item is reconciled exactly as `reconcile` would, one after the other; the per-
        transaction costs (BEGIN/COMMIT, the write version) are paid once, and the record
        appends of small repos are gathered into one append per `RECONCILE_CHUNK` rows. The
        DIDs must be distinct. A caller that must not lose the others to one bad item retries
        them one by one after a failure (backfill/reconcile.py does).
        """
        if len({item.did for item in items}) != len(items):
            raise ValueError("reconcile_many: a DID appears twice")
        now = now_utc()

        def body(con: duckdb.DuckDBPyConnection) -> list[ReconcileCounts]:
            puts = _Puts(now)
            out = [self._reconcile_in(con, item, now, puts) for item in items]
            puts.flush(con)
            return out

        counts: list[ReconcileCounts] = self._txn(body)
        self._note_appended(sum(c.added + c.updated + c.deleted + 2 for c in counts)
                            + sum(len(i.after.records) + len(i.after.repos) for i in items if i.after))
        return counts

    def _reconcile_in(
        self, con: duckdb.DuckDBPyConnection, item: ReconcileItem, now: datetime, puts: _Puts
    ) -> ReconcileCounts:
        """One item's reconcile inside the open transaction (see `reconcile`)."""
        did, rev, data_cid, commit_cid = item.did, item.rev, item.data_cid, item.commit_cid
        fetched, materialize, after, emit = item.fetched, item.materialize, item.after, item.emit
        snapshot, trust_data_root, run = item.snapshot, item.trust_data_root, item.run
        backfill_filter = item.backfill_filter
        self._txn_version = None  # each item its own write version, as in its own transaction
        if after is not None:
            puts.flush(con)  # nothing deferred may land after (newer than) `after`'s effects

        def body(con: duckdb.DuckDBPyConnection) -> ReconcileCounts:
            if not _holds(con, did):  # a DID new to the store: nothing stored to read or compare
                metrics.STORE_RECONCILE_READS.labels("skipped").inc()
                return _reconcile_full(con, fetched() if callable(fetched) else fetched, new=True)
            metrics.STORE_RECONCILE_READS.labels("read").inc()
            if trust_data_root and not (emit is not None and snapshot) and _same_root(con, did, data_cid):
                # no stored records under a trusted root: an empty repo, or a purged account that
                # came back (the purge leaves the row synchronized); the full path is cheap then
                stored = int(con.execute(COUNT_STORED_SQL, [did]).fetchall()[0][0])
                if stored:
                    return _reconcile_unchanged(con, did, rev, stored, now, after, emit)
            return _reconcile_full(con, fetched() if callable(fetched) else fetched)

        def _reconcile_unchanged(
            con: duckdb.DuckDBPyConnection, did: str, rev: str | None, stored: int,
            now: datetime, after: Batch | None, emit: Callable[[list[Change]], None] | None,
        ) -> ReconcileCounts:
            _finish(con, new=False)
            if emit is not None:
                emit(_backfill_changes(con, did, rev, now, {}, None, (), skip=set(), snapshot=False, run=run))
            return ReconcileCounts(added=0, updated=0, deleted=0, unchanged=stored)

        def _finish(con: duckdb.DuckDBPyConnection, *, new: bool) -> None:
            v = self._version(con)
            # `after`'s head group of this DID (appended below) replaces this one whole: one per transaction
            if after is None or did not in after.repos:
                current = None if new else repos.current_row(con, did)
                head = {c: current[c] for c in repos.HEAD_FIELDS} if current else {**_NEW_HEAD, "first_seen_at": now}
                head.update(rev=rev, data_cid=data_cid, commit_cid=commit_cid,
                            sync_state=SyncState.SYNCHRONIZED.value, desync_reason=None, desynced_at=None)
                repos.append_head_row(con, v, did, head)
            mark_backfilled(con, v, did, rev, now, run)
            if backfill_filter is not None:
                con.execute("INSERT INTO backfill_filters VALUES (?, ?, ?)", [did, backfill_filter, now])
            if after is not None:
                puts_cols, del_cols = record_columns(after)
                self._apply_in(con, after, now, puts_cols, del_cols)

        def _reconcile_full(
            con: duckdb.DuckDBPyConnection, fetched: Mapping[tuple[str, str], str], *, new: bool = False
        ) -> ReconcileCounts:
            existing = {} if new else dict(
                ((c, k), cid)
                for c, k, cid in con.execute(STORED_CIDS_SQL, [did]).fetchall()
            )
            changed = [key for key, cid in fetched.items() if existing.get(key) != cid]
            gone = [key for key in existing if key not in fetched]
            added = sum(1 for key in changed if key not in existing)
            # snapshot: decode every record once (to publish it), write only the changed ones
            every = materialize(list(fetched)) if emit is not None and snapshot else None
            v = next_version(con)
            if gone:
                dels = pa.table(
                    {"did": [did] * len(gone), "collection": [k[0] for k in gone], "rkey": [k[1] for k in gone],
                     "rev": [rev] * len(gone)},
                    schema=DELETE_SCHEMA,
                )
                append_deletes(con, v, dels, now)
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
                        "event_at": [None] * n,   # a fetched repo has no event time: the TID's
                    },
                    schema=RECORD_SCHEMA,
                )
                puts.add(con, v, table, defer=after is None)
                del table
                if emit is not None and every is None:
                    kept.append(cols)
                del cols
            _finish(con, new=new)
            if emit is not None:
                sent = every if every is not None else (RecordColumns.concat(kept) if changed else None)
                emit(_backfill_changes(con, did, rev, now, existing, sent, gone,
                                       skip={(c, k) for d, c, k in (after.records if after else ()) if d == did},
                                       snapshot=snapshot, run=run))
            return ReconcileCounts(
                added=added, updated=len(changed) - added, deleted=len(gone),
                unchanged=len(fetched) - len(changed),
            )

        return body(con)


    def trusted_root(self, did: str) -> str | None:
        """The stored data root under which `reconcile` would skip the diff (None: it would not).

        A hint read on its own cursor, outside the write lock: reconcile re-checks it.
        """
        with self.read() as reader:
            if not reader.fetchall(_HOLDS_SQL, [did] * 4)[0][0]:
                return None
            rows = reader.fetchall(f"SELECT data_cid FROM repos WHERE did = ? AND {_SAME_ROOT}",
                                   [did, *_SAME_ROOT_ARGS])
        return rows[0][0] if rows else None

    def stored_cids(self, did: str) -> dict[tuple[str, str], str]:
        """(collection, rkey) -> CID of the stored records of `did`, read outside the write lock."""
        with self.read() as reader:
            if not reader.fetchall(_HOLDS_SQL, [did] * 4)[0][0]:
                return {}
            rows = reader.fetchall(STORED_CIDS_SQL, [did])
        return {(c, k): cid for c, k, cid in rows}


# the head group of a DID that has no row yet (the v1 table's defaults)
_NEW_HEAD = {c: None for c in repos.HEAD_FIELDS} | {"active": True, "status": "active", "sync_state": "unknown"}

# The stored records of a repo row matching this are exactly the MST under its data_cid.
_SAME_ROOT = "sync_state = ? AND backfill_status = ? AND active IS NOT FALSE AND coalesce(status, 'active') = 'active'"
_SAME_ROOT_ARGS = (SyncState.SYNCHRONIZED.value, BackfillStatus.OK.value)


# Does the store hold any row of $did (records or repos, base or log)? Four plain point reads
# (~10 ms at 10^8 records): a DID without one has no stored records and no repos row, so the
# reads through the `records` and `repos` views (~25 ms each there: planning the views' merge
# plus the log anti-joins) are skipped for a DID new to the store, as most backfilled DIDs are.
_HOLDS_SQL = """SELECT EXISTS (FROM repo_base WHERE did = ?) OR EXISTS (FROM repo_log WHERE did = ?)
    OR EXISTS (FROM record_base WHERE did = ?) OR EXISTS (FROM record_log WHERE did = ?)"""


def _holds(con: duckdb.DuckDBPyConnection, did: str) -> bool:
    return bool(con.execute(_HOLDS_SQL, [did] * 4).fetchall()[0][0])


def _same_root(con: duckdb.DuckDBPyConnection, did: str, data_cid: str) -> bool:
    """The stored records of `did` are exactly the repo under `data_cid` (see `Store.reconcile`)."""
    rows = con.execute(
        f"SELECT 1 FROM repos WHERE did = ? AND data_cid = ? AND {_SAME_ROOT}", [did, data_cid, *_SAME_ROOT_ARGS]
    ).fetchall()
    return bool(rows)


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
    run: str | None,
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
                          seq=None, time=at, source="backfill", snapshot=snapshot, run=run))
    return out

