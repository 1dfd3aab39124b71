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
from typing import Any

from skyfill.protocol.repo import materialize
from skyfill.storage import Batch, ReconcileCounts, SyncState, thread_emitter

from .captures import Capture, Captures
from .daemon import Daemon
from .tracker import fold_ops

__all__ = ["Capture", "Captures", "DaemonReconciler"]


class DaemonReconciler:
    """The daemon-side Reconciler (see backfill.backfiller.Reconciler)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @property
    def trusts_data_root(self) -> bool:
        return self.daemon.want is None

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
        # and written after the reconcile they would roll its records back to older revs. Then
        # hold batch writes off: none may interleave with the reconcile transaction, and no
        # batch sealed before this point may be written after it (its repo rows are older).
        async with daemon.exclusive():
            # From here on the next attempt of this DID may begin: events applied after this
            # point are written after this reconcile (writes are held off), on top of it.
            capture = daemon.captures.close(did)
            rev = snapshot.rev
            replay = Batch()
            newer = [c for c in (capture.commits if capture else []) if rev is None or c.rev > rev]
            for commit in newer:
                fold_ops(commit, replay, daemon.want)
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
            # transaction, before COMMIT, so the topics never lag the mirror. Holding writes
            # off keeps daemon batches out meanwhile, so per DID the log stays in event order:
            # batches sealed before (already published), this reconcile, batches after.
            emit = None
            if daemon.config.publish and daemon.publish is not None:
                emit = thread_emitter(daemon.publish, asyncio.get_running_loop())

            def run() -> ReconcileCounts:
                return daemon.store.reconcile(
                    did, rev=rev, data_cid=snapshot.data_cid, commit_cid=snapshot.commit_cid,
                    fetched=lambda: snapshot.records, materialize=lambda keys: materialize(snapshot, keys),
                    after=replay, emit=emit,
                    # a collection filter keeps stored records short of the repo under a root
                    trust_data_root=daemon.want is None,
                )

            return await asyncio.to_thread(run)
