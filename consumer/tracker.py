"""Per-DID firehose state (sync 1.1): which events to apply, and when a repo's chain breaks.

The tracker owns the live `RepoRow` of every DID seen, in memory, and folds each event into a
storage Batch. It never reads or writes the database itself; the daemon seals batches (copying
the rows) and writes them.

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum

from skyfill.storage import AccountStatus, Batch, RecordPut, RepoRow, SyncState

from skyfill.protocol.events import Account, Commit, Event, Identity, Sync

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
            batch.delete_record(did, op.collection, op.rkey)
        elif op.record is not None and op.cid is not None:
            batch.put_record(did, op.collection, op.rkey, RecordPut(op.cid, rev, op.record, op.created_at, commit.time))
        # else: a create/update without its body (tooBig): the backfill brings it.


class Tracker:
    """In-memory per-DID state. `rows` is what `Store.load_repos()` returned at start-up."""

    def __init__(
        self,
        rows: Mapping[str, RepoRow] | Iterable[RepoRow] = (),
        *,
        want: Callable[[str], bool] | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.rows: dict[str, RepoRow] = (
            dict(rows) if isinstance(rows, Mapping) else {row.did: row for row in rows}
        )
        self.want = want
        self._clock = clock
        self.stream_seq: int | None = None
        self.counts: dict[Verdict, int] = {v: 0 for v in Verdict}
        self.desync_reasons: dict[str, int] = {}

    # -- queries --------------------------------------------------------------------------

    def row(self, did: str) -> RepoRow | None:
        return self.rows.get(did)

    @property
    def desynchronized_total(self) -> int:
        """Chain breaks found since start-up (not the number of DIDs currently desynchronized)."""
        return self.counts[Verdict.DESYNCHRONIZED]

    # -- changes --------------------------------------------------------------------------

    def reset_stream(self) -> None:
        """Forget the stream's seq mark: the next event starts a new seq sequence."""
        self.stream_seq = None

    def mark_synchronized(self, did: str, rev: str | None, data_cid: str, commit_cid: str) -> RepoRow:
        """A backfill reconciled `did` at `rev`: make the in-memory row agree with the database.

        A head newer than `rev` (a commit applied while the repo was being fetched) is kept.
        """
        row = self.rows.get(did)
        if row is None:
            row = self.rows[did] = RepoRow(did=did, first_seen_at=self._clock())
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
        row = self.rows.get(event.did)
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
        row = self.rows.get(event.did)
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

    def _row_for(self, did: str, time: str) -> RepoRow:
        row = self.rows.get(did)
        if row is None:
            row = self.rows[did] = RepoRow(did=did, first_seen_at=_event_time(time, self._clock))
        return row

    @staticmethod
    def _touch(row: RepoRow, seq: int, time: str, batch: Batch) -> None:
        row.last_seq = seq
        row.last_event_at = time
        batch.put_repo(row)

    def _count(self, verdict: Verdict) -> Verdict:
        self.counts[verdict] += 1
        return verdict
