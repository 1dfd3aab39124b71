"""Per-DID firehose state (sync 1.1): which events to apply, and when a repo's chain breaks.

The tracker owns the live `RepoRow` of the DIDs it holds (a bounded cache, see Memory below) and
folds each event into a storage Batch. It never writes the database (the daemon seals batches,
copying the rows, and writes them); it reads a DID's committed row through `load` on a miss.

Rules, in the order they are checked:
1. seq: an event whose seq <= the highest seq seen on this stream is dropped (stale_seq). Every
   other event, even one dropped by a later rule, moves that mark: the daemon's cursor passes it.
   `reset_stream()` forgets the mark (new relay or FutureCursor restart: seqs start over).
2. #commit/#sync for an account we hold as inactive are dropped (inactive).
3. #commit/#sync whose rev <= the rev we hold are dropped (stale_rev). Revs are TIDs, so string
   order is time order.
4. #commit on a DID whose rev we hold: `since` != held rev, or (both present) `prevData` != held
   data CID, means commits were missed. The ops are still applied (they are real and newer), but
   the DID becomes desynchronized until a backfill reconciles it. Worked example: held rev r5;
   commit r7 arrives with since r6 -> apply r7's ops, sync_state=desynchronized,
   desync_reason=since_mismatch; r6's effects are only recovered by fetching the repo.
   A tooBig commit (no record bodies) applies its deletes and desynchronizes (too_big).
5. #sync whose data root differs from the held one: take its head, desynchronize
   (sync_data_mismatch). A #sync on a DID with no held data root just takes the head.
6. #account stores active/status (status deleted -> every record of the DID purged);
   #identity stores the handle when one is given.
A new DID starts with sync_state unknown: nothing has proven that we hold its whole repo.
first_seen_at and desynced_at are event times (the `time` of the event), not the wall clock.

Memory: with `load` (the daemon passes `Store.repo_row`) `rows` is a bounded LRU cache, not every
DID: a DID not cached is read from the store on first use, and `trim` evicts the least recently
used rows beyond `capacity`, but never a row changed since the last committed batch (its change
is not in the store yet: reading it back would lose it). Batches are numbered as the daemon
seals them (`sealed()`); a row changed while batch n fills is pinned until n batches committed.
`row(did)` pins too: its caller may change the live row (the resync does).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum

from skyfill.protocol.events import Account, Commit, Event, Identity, Sync
from skyfill.storage import AccountStatus, Batch, RecordPut, RepoRow, SyncState

from .known_dids import KnownDids

__all__ = ["Tracker", "Verdict", "fold_ops"]

_KNOWN_STATUS = frozenset(s.value for s in AccountStatus)
_DESYNC = SyncState.DESYNCHRONIZED.value
_DELETED = AccountStatus.DELETED.value


class Verdict(StrEnum):
    APPLIED = "applied"
    STALE_REV = "stale_rev"            # rev <= the held rev
    STALE_SEQ = "stale_seq"            # seq <= the last seq seen on this stream
    INACTIVE = "inactive"              # #commit/#sync for an inactive account
    DESYNCHRONIZED = "desynchronized"  # applied, but the chain broke (reason on the row)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _event_time(text: str, fallback: Callable[[], datetime]) -> datetime:
    """first_seen_at and desynced_at are on the event timeline (like coverage spans and the
    gap detector's windows), not the wall clock: a replayed week-old event is week-old."""
    try:
        ts = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        return fallback()
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def fold_ops(commit: Commit, batch: Batch, want: Callable[[str], bool] | None) -> None:
    """Fold a commit's record ops (of the collections `want` keeps) into `batch` as puts and deletes.

    The one place a commit becomes record writes: the tracker for every applied commit, the resync
    for the captured commits it replays over a fetched repo."""
    did = commit.did
    rev = commit.rev
    for op in commit.ops:
        if want is not None and not want(op.collection):
            continue
        if op.action == "delete":
            batch.delete_record(did, op.collection, op.rkey, rev)
        elif op.record is not None and op.cid is not None:
            batch.put_record(did, op.collection, op.rkey, RecordPut(op.cid, rev, op.record, op.created_at, commit.time))
        # else: a create/update without its body (tooBig): the backfill brings it.


class Tracker:
    """Per-DID state: `rows` given up front, plus (with `load`) the rows read from the store on a
    miss, at most about `capacity` of them once `trim` ran (see the module docstring)."""

    def __init__(
        self,
        rows: Mapping[str, RepoRow] | Iterable[RepoRow] = (),
        *,
        want: Callable[[str], bool] | None = None,
        clock: Callable[[], datetime] = _utcnow,
        load: Callable[[str], RepoRow | None] | None = None,
        capacity: int | None = None,
        known: KnownDids | None = None,
    ) -> None:
        self.rows: OrderedDict[str, RepoRow] = OrderedDict(
            rows.items() if isinstance(rows, Mapping) else ((row.did, row) for row in rows)
        )
        self.want = want
        self._clock = clock
        self._load = load
        self._known = known                # DIDs `load` may find (None: try every miss)
        self.capacity = capacity
        self._filling = 1                  # the number of the batch now filling (1 = the first)
        self._pinned: dict[str, int] = {}  # did -> the batch holding its last change
        self.loads = 0                     # misses read from the store
        self.stream_seq: int | None = None
        self.counts: dict[Verdict, int] = {v: 0 for v in Verdict}
        self.desync_reasons: dict[str, int] = {}

    # -- queries --------------------------------------------------------------------------

    def row(self, did: str) -> RepoRow | None:
        """The live row of `did` (read from the store on a miss), pinned until the batch now
        filling is committed: the caller may change it."""
        row = self._get(did)
        if row is not None:
            self._pinned[did] = self._filling
        return row

    @property
    def desynchronized_total(self) -> int:
        """Chain breaks found since start-up (not the number of DIDs currently desynchronized)."""
        return self.counts[Verdict.DESYNCHRONIZED]

    # -- changes --------------------------------------------------------------------------

    def sealed(self) -> None:
        """The daemon sealed the filling batch (it holds something): the next one starts."""
        self._filling += 1

    def trim(self, committed: int) -> int:
        """Evict least recently used rows beyond `capacity` whose last change is in one of the
        first `committed` batches (committed: the store holds it). Returns the rows evicted."""
        if self.capacity is None or len(self.rows) <= self.capacity:
            return 0
        excess = len(self.rows) - self.capacity
        pinned = self._pinned
        gone: list[str] = []
        for did in self.rows:
            batch = pinned.get(did)
            if batch is None or batch <= committed:
                gone.append(did)
                if len(gone) == excess:
                    break
        for did in gone:
            del self.rows[did]
            pinned.pop(did, None)
        if len(pinned) > 2 * len(self.rows):  # pins of rows long evicted or committed
            self._pinned = {d: b for d, b in pinned.items() if b > committed and d in self.rows}
        return len(gone)

    def reset_stream(self) -> None:
        """Forget the stream's seq mark: the next event starts a new seq sequence."""
        self.stream_seq = None

    def mark_synchronized(self, did: str, rev: str | None, data_cid: str, commit_cid: str) -> RepoRow:
        """A backfill reconciled `did` at `rev`: make the in-memory row agree with the database.

        A head newer than `rev` (a commit applied while the repo was being fetched) is kept.
        """
        row = self._get(did)
        if row is None:
            row = self.rows[did] = RepoRow(did=did, first_seen_at=self._clock())
            if self._known is not None:
                self._known.add(did)
        self._pinned[did] = self._filling
        if row.rev is None or rev is None or row.rev <= rev:
            row.rev, row.data_cid, row.commit_cid = rev, data_cid, commit_cid
        row.sync_state = SyncState.SYNCHRONIZED.value
        row.desync_reason = None
        row.desynced_at = None
        return row

    def apply(self, event: Event, batch: Batch) -> Verdict:
        """Fold one repo event into `batch`; the verdict says what happened to it."""
        if not isinstance(event, (Commit, Sync, Identity, Account)):
            raise TypeError(f"not a repo event: {type(event).__name__}")
        seq = event.seq
        if self.stream_seq is not None and seq <= self.stream_seq:
            return self._count(Verdict.STALE_SEQ)
        self.stream_seq = seq

        if isinstance(event, Commit):
            verdict = self._commit(event, batch)
        elif isinstance(event, Sync):
            verdict = self._sync(event, batch)
        else:
            row = self._row_for(event.did, event.time)
            if isinstance(event, Account):
                row.active = event.active
                status = event.status
                if status is None or status not in _KNOWN_STATUS:
                    status = AccountStatus.ACTIVE.value if event.active else AccountStatus.DEACTIVATED.value
                row.status = status
                if status == _DELETED:
                    batch.purge_did(event.did)
                    # Nothing stored proves this repo any more: a reactivated account must be
                    # fetched again, never trusted on its data root (see Store.reconcile).
                    row.sync_state = SyncState.UNKNOWN.value
            elif event.handle is not None:
                row.handle = event.handle
            self._touch(row, event.seq, event.time, batch)
            verdict = Verdict.APPLIED
        return self._count(verdict)

    # -- internals ------------------------------------------------------------------------

    def _commit(self, event: Commit, batch: Batch) -> Verdict:
        row = self._get(event.did)
        reason: str | None = None
        if row is not None:
            if not row.active:
                return Verdict.INACTIVE
            held = row.rev
            if held is not None:
                if event.rev <= held:
                    return Verdict.STALE_REV
                if event.since != held:
                    reason = "since_mismatch"
                elif (
                    event.prev_data is not None
                    and row.data_cid is not None
                    and event.prev_data != row.data_cid
                ):
                    reason = "prev_data_mismatch"
        else:
            row = self._row_for(event.did, event.time)
        if event.too_big and reason is None:
            reason = "too_big"

        fold_ops(event, batch, self.want)
        row.rev = event.rev
        row.data_cid = event.data_cid
        row.commit_cid = event.commit_cid
        return self._finish(row, reason, event.seq, event.time, batch)

    def _sync(self, event: Sync, batch: Batch) -> Verdict:
        row = self._get(event.did)
        reason: str | None = None
        if row is not None:
            if not row.active:
                return Verdict.INACTIVE
            if row.rev is not None and event.rev <= row.rev:
                return Verdict.STALE_REV
            if row.data_cid is not None and row.data_cid != event.data_cid:
                reason = "sync_data_mismatch"
        else:
            row = self._row_for(event.did, event.time)
        row.rev = event.rev
        row.data_cid = event.data_cid
        row.commit_cid = event.commit_cid
        return self._finish(row, reason, event.seq, event.time, batch)

    def _finish(self, row: RepoRow, reason: str | None, seq: int, time: str, batch: Batch) -> Verdict:
        verdict = Verdict.APPLIED
        if reason is not None:
            row.sync_state = _DESYNC
            row.desync_reason = reason
            row.desynced_at = _event_time(time, self._clock)
            self.desync_reasons[reason] = self.desync_reasons.get(reason, 0) + 1
            verdict = Verdict.DESYNCHRONIZED
        self._touch(row, seq, time, batch)
        return verdict

    def _get(self, did: str) -> RepoRow | None:
        """The row of `did`: cached (now the most recently used), else read from the store."""
        rows = self.rows
        row = rows.get(did)
        if row is not None:
            rows.move_to_end(did)
        elif self._load is not None and (self._known is None or self._known.may_hold(did)):
            row = self._load(did)
            self.loads += 1
            if row is not None:
                rows[did] = row
        return row

    def _row_for(self, did: str, time: str) -> RepoRow:
        row = self._get(did)
        if row is None:
            row = self.rows[did] = RepoRow(did=did, first_seen_at=_event_time(time, self._clock))
            if self._known is not None:
                self._known.add(did)
        return row

    def _touch(self, row: RepoRow, seq: int, time: str, batch: Batch) -> None:
        row.last_seq = seq
        row.last_event_at = time
        self._pinned[row.did] = self._filling
        batch.put_repo(row)

    def _count(self, verdict: Verdict) -> Verdict:
        self.counts[verdict] += 1
        return verdict
