"""Reconciling a fetched repo inside the running daemon without losing racing firehose events.

Ordering rule. `begin(did)` starts capturing the DID's applied commits BEFORE the getRepo
request is sent, so every commit newer than the fetched rev R is captured (the PDS serves a
repo at least as new as any commit the relay has already delivered). `commit` then, in ONE
transaction: makes the stored records equal the snapshot at R, and re-applies the captured
commits whose rev > R. The firehose keeps writing normally meanwhile, so nothing waits on the
fetch and the cursor never depends on it.

Worked example: the stored head is r5; begin(); the firehose applies r6 (create a/9) and
r7 (delete a/1); the fetch returns the repo at r6 (has a/1 and a/9). Reconcile to r6, then
replay r7: a/1 deleted, a/9 kept. Result = the repo at r7, which is also what the tracker
holds. Had the fetch returned r7, nothing would be replayed.

If the chain broke while capturing (a desynchronized verdict or a #sync), the captured
commits cannot be trusted to be complete: the snapshot is still applied, but the DID stays
desynchronized so it is fetched again.

One attempt per DID at a time. Two backfills of one DID (two `skyfill backfill --dids X`, or one
beside the queue loop) take turns: the second `begin` waits until the first attempt has taken
its capture (in `commit`) or given up (`abort`), so it fetches a repo at least as new as what
the first one stores, and captures from there. Worked example of what concurrent attempts did
with one shared capture: A begins, B begins (replacing A's capture), A commits (taking B's),
the DID commits r8, B's fetch (served at r7) reconciles with no capture and deletes r8's record.
Serialized, B begins after A took its capture, so r8 is in B's capture and replayed.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from skyfill.protocol.repo import materialize
from skyfill.storage import Batch, ReconcileCounts, RecordPut, SyncState, thread_emitter

from skyfill.protocol.events import Commit

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["Capture", "Captures", "DaemonReconciler"]


@dataclass(slots=True, eq=False)
class Capture:
    """Firehose commits of one DID seen while its repo is being fetched, for one attempt."""

    owner: asyncio.Task[Any] | None
    commits: list[Commit] = field(default_factory=list)
    desynced: bool = False


@dataclass(slots=True)
class _Turn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # attempts holding or waiting for the lock; the entry goes at 0


class Captures:
    """The daemon's open captures, at most one per DID (see "One attempt per DID at a time").

    An attempt is identified by its asyncio task: the backfiller runs begin, commit and abort
    of one attempt in one task, so a late `abort` of attempt A never closes attempt B's capture.
    """

    def __init__(self) -> None:
        self.active: dict[str, Capture] = {}  # read by the daemon for every applied event
        self._turns: dict[str, _Turn] = {}

    def __len__(self) -> int:
        return len(self.active) + len(self._turns)

    async def open(self, did: str) -> Capture:
        """Wait for this DID's turn, then start capturing its commits."""
        turn = self._turns.get(did)
        if turn is None:
            turn = self._turns[did] = _Turn()
        turn.users += 1
        try:
            await turn.lock.acquire()
        except BaseException:
            self._leave(did, turn)
            raise
        capture = self.active[did] = Capture(owner=asyncio.current_task())
        return capture

    def close(self, did: str) -> Capture | None:
        """Stop the calling attempt's capture of `did` and hand the turn on; None if it holds none."""
        capture = self.active.get(did)
        if capture is None or capture.owner is not asyncio.current_task():
            return None
        del self.active[did]
        turn = self._turns[did]
        turn.lock.release()
        self._leave(did, turn)
        return capture

    def _leave(self, did: str, turn: _Turn) -> None:
        turn.users -= 1
        if turn.users == 0:
            del self._turns[did]


class DaemonReconciler:
    """The daemon-side Reconciler (see backfill.backfiller.Reconciler)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @property
    def trusts_data_root(self) -> bool:
        return self.daemon._want is None

    async def begin(self, did: str) -> None:
        await self.daemon.captures.open(did)

    async def abort(self, did: str) -> None:
        self.daemon.captures.close(did)

    async def commit(self, did: str, snapshot: Any) -> ReconcileCounts:
        try:
            return await self._commit(did, snapshot)
        finally:
            self.daemon.captures.close(did)  # a no-op once _commit took it; never another attempt's

    async def _commit(self, did: str, snapshot: Any) -> ReconcileCounts:
        daemon = self.daemon
        # Store (and publish) everything applied before begin(): such events are not captured,
        # and written after the reconcile they would roll its records back to older revs.
        await daemon._flush(wait=True)
        # Hold the flush lock: no batch write may interleave with the reconcile transaction, and
        # no batch sealed before this point may be written after it (its repo rows are older).
        async with daemon.flush_lock:
            await daemon.settle_write()
            # From here on the next attempt of this DID may begin: events applied after this
            # point are written after this reconcile (the flush lock is held), on top of it.
            capture = daemon.captures.close(did)
            rev = snapshot.rev
            replay = Batch()
            newer = [c for c in (capture.commits if capture else []) if rev is None or c.rev > rev]
            want = daemon._want
            for commit in newer:
                for op in commit.ops:
                    if want is not None and not want(op.collection):
                        continue
                    if op.action == "delete":
                        replay.delete_record(did, op.collection, op.rkey)
                    elif op.cid is not None:
                        replay.put_record(did, op.collection, op.rkey,
                                          RecordPut(op.cid, commit.rev, op.record, op.created_at))
            row = daemon.tracker.row(did)
            broken = capture is None or capture.desynced
            if row is not None:
                if row.rev is None or (rev is not None and row.rev <= rev):
                    row.rev, row.data_cid, row.commit_cid = rev, snapshot.data_cid, snapshot.commit_cid
                if not broken:
                    row.sync_state = SyncState.SYNCHRONIZED.value
                    row.desync_reason = None
                    row.desynced_at = None
                replay.put_repo(copy.copy(row))
            else:
                daemon.tracker.mark_synchronized(did, rev, snapshot.data_cid, snapshot.commit_cid)

            # Publishing: the diff (and the repo row) is acknowledged inside the reconcile
            # transaction, before COMMIT, so the topics never lag the mirror. The flush lock
            # keeps daemon batches out meanwhile, so per DID the log stays in event order:
            # batches sealed before (already published), this reconcile, batches after.
            emit = None
            if daemon.config.publish and daemon._publish is not None:
                emit = thread_emitter(daemon._publish, asyncio.get_running_loop())

            def run() -> ReconcileCounts:
                return daemon.store.reconcile(
                    did, rev=rev, data_cid=snapshot.data_cid, commit_cid=snapshot.commit_cid,
                    fetched=lambda: snapshot.records, materialize=lambda keys: materialize(snapshot, keys),
                    after=replay, emit=emit,
                    # a collection filter keeps stored records short of the repo under a root
                    trust_data_root=daemon._want is None,
                )

            return await asyncio.to_thread(run)
