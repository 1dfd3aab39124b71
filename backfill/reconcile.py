"""Where a verified repo snapshot goes: the `Reconciler` protocol and its standalone `StoreReconciler`.

Sink ordering: `begin(did)` runs BEFORE the getRepo request is sent and is always paired with
exactly one `commit` or `abort`, so a daemon-side reconciler can capture firehose commits that
race the fetch (see consumer/resync.py). `premade` decodes the records a reconcile will ask for
ahead of it, mostly outside the store's write lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import libipld

from skyfill.errors import SkyfillError
from skyfill.protocol.repo import RepoSnapshot, materialize
from skyfill.protocol.syntax import collection_matcher
from skyfill.storage import Publish, ReconcileCounts, RecordColumns, Store, thread_emitter
from skyfill.storage.discovery import ALL_COLLECTIONS, canonical_filter
from skyfill.storage.reconcile import RECONCILE_CHUNK, ReconcileItem

__all__ = ["Reconciler", "StoreReconciler", "premade", "new_run_id", "BATCH_MAX_REPOS", "BATCH_MAX_RECORDS"]

log = logging.getLogger(__name__)

# Group commit (StoreReconciler): at most this many repos per transaction, and only repos of at
# most this many records (a bigger one pays its transaction's fixed cost over its records anyway,
# and keeps `premade`'s decoding ahead of the writes).
BATCH_MAX_REPOS = 64
BATCH_MAX_RECORDS = 2_000


def new_run_id() -> str:
    """A backfill run's id: its start time (sortable), then 6 random hex digits."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


class Reconciler(Protocol):
    """Where a verified snapshot goes. One `begin` per attempt, then exactly one `commit` or `abort`.

    begin(did)             called before the getRepo request is sent (start capturing racing events)
    commit(did, snapshot)  make storage equal the snapshot (+ anything newer captured); returns counts
    abort(did)             the attempt failed; drop whatever `begin` set up
    """

    async def begin(self, did: str) -> None: ...

    async def commit(self, did: str, snapshot: RepoSnapshot) -> ReconcileCounts: ...

    async def abort(self, did: str) -> None: ...


def premade(store: Store, snapshot: RepoSnapshot, *, every: bool) -> Callable[[list[tuple[str, str]]], Any]:
    """A `materialize` for `Store.reconcile` that decodes ahead, mostly outside the write lock.

    Record decoding is the costliest step of a fresh backfill. The diff is taken now against
    the stored CIDs (read without the lock) and its first chunk is decoded before the lock is
    taken; while reconcile writes chunk k, a thread decodes chunk k+1 (DuckDB releases the GIL
    while it inserts). Reconcile diffs again inside its transaction: any request that is not
    the predicted next chunk is decoded on the spot, so a store that changed meanwhile only
    costs speed. At most two chunks of JSON exist at a time, whatever the repo's size.

    The snapshot's blocks are CONSUMED as records are decoded (MST nodes at once: the walk is
    done), so the freed memory is reused for the JSON. A snapshot whose walk was deferred (the
    stored root matched: reconcile is expected to take its unchanged path) decodes on demand.
    """
    if snapshot.walked is None:
        return lambda keys: materialize(snapshot, keys)
    fetched = snapshot.records
    if every:
        keys = list(fetched)
    else:
        stored = store.stored_cids(snapshot.did)
        keys = [key for key, cid in fetched.items() if stored.get(key) != cid] if stored else list(fetched)
        del stored
    blocks = snapshot.blocks
    record_cids = {libipld.decode_multibase(cid)[1] for cid in fetched.values()}
    for raw in [raw for raw in blocks if raw not in record_cids]:
        del blocks[raw]
    del record_cids
    # a record CID still needed by a key not decoded here (identical records share a block)
    keep = {fetched[key] for key in fetched.keys() - set(keys)} if len(keys) != len(fetched) else set()

    def decode(part: list[tuple[str, str]]) -> RecordColumns:
        cols = materialize(snapshot, part)
        for cid in cols.cid:
            if cid not in keep:
                blocks.pop(libipld.decode_multibase(cid)[1], None)
        return cols

    # the chunk decoded ahead: its keys, then its columns (or the error) once its thread is done
    ahead: dict[str, Any] = {"keys": [], "cols": None, "error": None, "thread": None}
    spare: dict[tuple[str, str], tuple[RecordColumns, int]] = {}  # decoded, not handed out

    def start(pos: int, size: int) -> None:
        part = keys[pos : pos + size]
        ahead.update(keys=part, cols=None, error=None, thread=None, pos=pos + size)
        if not part:
            return

        def run() -> None:
            try:
                ahead["cols"] = decode(part)
            except BaseException as exc:  # re-raised in the reconcile thread
                ahead["error"] = exc

        ahead["thread"] = threading.Thread(target=run, name="premade", daemon=True)
        ahead["thread"].start()

    def serve(wanted: list[tuple[str, str]]) -> RecordColumns:
        if ahead["thread"] is not None:
            ahead["thread"].join()
            ahead["thread"] = None
        if ahead["error"] is not None:
            raise ahead["error"]
        cols: RecordColumns | None = ahead["cols"]
        if cols is not None and wanted == ahead["keys"]:
            start(ahead["pos"], len(wanted))
            return cols
        # not the predicted chunk (the stored records changed, or another chunking): serve
        # what was decoded from it, decode the rest here; no more decoding ahead
        if cols is not None:
            spare.update((key, (cols, i)) for i, key in enumerate(zip(cols.collection, cols.rkey)))
        ahead.update(keys=[], cols=None)
        extra = materialize(snapshot, [key for key in wanted if key not in spare])
        at = {key: (extra, i) for i, key in enumerate(zip(extra.collection, extra.rkey))}
        return RecordColumns.gather([spare.pop(key) if key in spare else at[key] for key in wanted])

    start(0, RECONCILE_CHUNK)  # the first chunk decodes before the lock is taken
    return serve


class StoreReconciler:
    """Standalone sink: no firehose runs in this process, so nothing can race the fetch.

    With `publish`, the reconciliation's changes are acknowledged by the broker before the
    local transaction commits (Store.reconcile's `emit`). `snapshot=True` (backfill workers,
    whose local store is not the shared mirror) publishes every record of the fetched repo, not
    the diff against a local copy that may be stale relative to the topics.

    `collections` (NSIDs or prefixes with .*): store only those records of the repo (the others
    the DID holds are deleted: the mirror equals getRepo restricted to them). The filter used is
    recorded for the DID ("*" for none, once a filtered backfill ever ran) in the reconcile's own
    transaction (`backfill_filter`): a crash cannot leave the records of one filter with the
    record of another. The daemon's own reconciler (consumer/resync.py) stores every
    collection and records nothing: a DID it refetches after a filtered backfill stays flagged
    `filter_changed` (one backfill too many, never a hole).
    """

    def __init__(
        self, store: Store, *, publish: Publish | None = None, snapshot: bool = False,
        collections: Sequence[str] = (), run: str | None = None,
    ) -> None:
        self.store = store
        # this backfill run's id, recorded on each repo row it completes (repos.backfill_run)
        # and sent with its `kind: "backfill"` repo message
        self.run = run or new_run_id()
        self.publish = publish
        self.snapshot = snapshot
        self.want = collection_matcher(list(collections)) if collections else None
        self.filter = canonical_filter(collections)
        # a whole backfill records "*" only once some filtered one exists (it must override that
        # DID's narrower filter); a mirror never filtered spends no transaction on it
        self.records_filter = self.filter != ALL_COLLECTIONS or store.has_backfill_filters()
        # publishing a snapshot needs every record: never skip the MST walk; a filtered store
        # holds a part of the MST, so an equal root proves nothing about it
        self.trusts_data_root = not (snapshot and publish is not None) and self.want is None
        # group commit: snapshots waiting for the writer, and the writer task (one at a time)
        self.max_batch = BATCH_MAX_REPOS
        self._pending: list[tuple[ReconcileItem, asyncio.Future[ReconcileCounts]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def begin(self, did: str) -> None:
        return None

    async def commit(self, did: str, snapshot: RepoSnapshot) -> ReconcileCounts:
        emit = thread_emitter(self.publish, asyncio.get_running_loop()) if self.publish is not None else None

        every = emit is not None and self.snapshot
        want = self.want
        if want is not None:
            snapshot = dataclasses.replace(
                snapshot, walked={key: cid for key, cid in snapshot.records.items() if want(key[0])})

        if emit is None and (snapshot.walked is None or len(snapshot.walked) <= BATCH_MAX_RECORDS):
            return await self._batched(ReconcileItem(
                did, rev=snapshot.rev, data_cid=snapshot.data_cid, commit_cid=snapshot.commit_cid,
                fetched=lambda: snapshot.records,
                # not `premade`: a failed batch is retried one by one, and premade consumes the blocks
                materialize=lambda keys: materialize(snapshot, keys),
                trust_data_root=self.trusts_data_root, run=self.run,
                backfill_filter=self.filter if self.records_filter else None))

        def run() -> ReconcileCounts:
            return self.store.reconcile(
                did,
                rev=snapshot.rev,
                data_cid=snapshot.data_cid,
                commit_cid=snapshot.commit_cid,
                fetched=lambda: snapshot.records,
                materialize=premade(self.store, snapshot, every=every),
                emit=emit,
                snapshot=self.snapshot,
                trust_data_root=self.trusts_data_root,
                run=self.run,
                backfill_filter=self.filter if self.records_filter else None,
            )

        return await asyncio.to_thread(run)

    async def abort(self, did: str) -> None:
        return None

    # -- group commit ------------------------------------------------------------------------

    async def _batched(self, item: ReconcileItem) -> ReconcileCounts:
        """Reconcile `item` in the next batch; returns once that batch COMMITTED (or raises its error).

        Group commit: while the writer stores one batch, the snapshots finished meanwhile wait;
        the next batch takes them all (up to `max_batch`, DIDs distinct), in one transaction
        (`Store.reconcile_many`). Under load, batches grow to the number of repos finished per
        transaction; alone, a repo is written at once. A failed batch is retried one item per
        transaction, so one bad repo fails alone, as it would unbatched.
        """
        future: asyncio.Future[ReconcileCounts] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_batches())
        return await future

    async def _write_batches(self) -> None:
        while self._pending:
            batch: list[tuple[ReconcileItem, asyncio.Future[ReconcileCounts]]] = []
            rest: list[tuple[ReconcileItem, asyncio.Future[ReconcileCounts]]] = []
            dids: set[str] = set()
            for entry in self._pending:
                if entry[1].done():  # its caller was cancelled: nothing waits for it
                    continue
                if len(batch) < self.max_batch and entry[0].did not in dids:
                    batch.append(entry)
                    dids.add(entry[0].did)
                else:
                    rest.append(entry)
            self._pending = rest
            if not batch:
                continue
            try:
                await self._write(batch)
            except BaseException as exc:  # cancelled, or a bug: nobody may wait forever
                for _, future in batch + self._pending:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else SkyfillError(repr(exc)))
                self._pending = []
                raise

    async def _write(self, batch: list[tuple[ReconcileItem, asyncio.Future[ReconcileCounts]]]) -> None:
        items = [item for item, _ in batch]
        try:
            counts = await asyncio.to_thread(self.store.reconcile_many, items)
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], error=exc)
                return
            log.warning("batched reconcile failed; retrying its repos one by one",
                        extra={"ctx": {"repos": len(batch), "error": repr(exc)}})
            for item, future in batch:
                await self._write([(item, future)])
            return
        for (_, future), n in zip(batch, counts, strict=True):
            _settle(future, result=n)


def _settle(future: asyncio.Future[ReconcileCounts], *, result: ReconcileCounts | None = None,
            error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    elif result is not None:
        future.set_result(result)
