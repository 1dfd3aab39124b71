"""The async backfiller: DID -> identity -> getRepo -> verified snapshot -> reconcile.

Outcome rule. Every DID attempted ends in exactly one of:
    ok          reconciled (the sink's commit returned); repo row rev/data_cid set, synchronized
    terminal    RepoNotFound / RepoTakendown / RepoSuspended / RepoDeactivated (the PDS said so),
                InvalidDidDocument, SignatureFailed (after one fresh re-resolve), UnsafeHost,
                Failed (transient failures reached `max_attempts`, or the repo is over the size cap)
                -> recorded on the row with no retry_after; the queue never hands it out again
    retrying    5xx / network / truncated or corrupt CAR / PLC trouble -> row status 'retrying'
                with a jittered retry_after (1 min doubling to 1 h)
    deferred    the host is parked by rate limits past our patience: in queue mode the queue row
                gets retry_after = the park's end and no attempt is counted; in list mode the
                DID waits for the park (outside the concurrency cap) and goes again, until a
                park would end more than `config.rate_limit_patience` after the DID's first
                deferral (in-request waits are capped to that deadline too): then the repo
                row is recorded 'retrying' with retry_after = the park's end (no attempt
                counted) and the run goes on, so `backfill --dids` against a host that
                answers 429 forever ends after about the patience (10 min by default)
A fetch failure is never recorded as done: only the sink's commit marks a repo reconciled.

Sink ordering: `sink.begin(did)` runs BEFORE the getRepo request is sent and is always
paired with exactly one `commit` or `abort`, so a daemon-side sink can capture firehose
commits that race the fetch (see consumer/resync.py).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import libipld

from skyfill import metrics
from skyfill.backoff import backoff_delay
from skyfill.protocol.crypto import PublicKey, parse_public_key
from skyfill.errors import (
    IdentityError,
    RateLimited,
    RepoError,
    RetryableFetchError,
    SignatureError,
    SkyfillError,
    TerminalFetchError,
    UnsafeHostError,
)
from skyfill.storage import (
    TERMINAL_BACKFILL,
    BackfillStatus,
    Change,
    Publish,
    QueueState,
    ReconcileCounts,
    RecordColumns,
    Store,
    thread_emitter,
)
from skyfill.storage.writer import RECONCILE_CHUNK as _RECONCILE_CHUNK

from .config import BackfillConfig
from skyfill.net.identity import ResolvedIdentity, Resolver
from skyfill.net.pds import PdsClient
from skyfill.protocol.repo import RepoSnapshot, materialize, parse_repo

__all__ = [
    "Backfiller",
    "BackfillSummary",
    "Reconciler",
    "StoreReconciler",
    "backoff",
    "recover_queue",
    "open_backfiller",
]

log = logging.getLogger(__name__)

# Wait at most this long (and never past the DID's rate-limit patience) for a parked host
# inside one request before deferring the DID instead.
_HOST_PATIENCE = 30.0
_QUEUE_CLAIM = 500


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

    start(0, _RECONCILE_CHUNK)  # the first chunk decodes before the lock is taken
    return serve


class StoreReconciler:
    """Standalone sink: no firehose runs in this process, so nothing can race the fetch.

    With `publish`, the reconciliation's changes are acknowledged by the broker before the
    local transaction commits (Store.reconcile's `emit`). `snapshot=True` (backfill workers,
    whose local store is not the shared mirror) publishes every record of the fetched repo, not
    the diff against a local copy that may be stale relative to the topics.
    """

    def __init__(self, store: Store, *, publish: Publish | None = None, snapshot: bool = False) -> None:
        self.store = store
        self.publish = publish
        self.snapshot = snapshot
        # publishing a snapshot needs every record: never skip the MST walk
        self.trusts_data_root = not (snapshot and publish is not None)

    async def begin(self, did: str) -> None:
        return None

    async def commit(self, did: str, snapshot: RepoSnapshot) -> ReconcileCounts:
        emit = thread_emitter(self.publish, asyncio.get_running_loop()) if self.publish is not None else None

        every = emit is not None and self.snapshot

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
            )

        return await asyncio.to_thread(run)

    async def abort(self, did: str) -> None:
        return None


@dataclass(frozen=True, slots=True)
class BackfillSummary:
    repos_ok: int
    failed: dict[str, int]          # outcome -> repos (terminal statuses, 'retrying', 'deferred')
    records_added: int
    records_updated: int
    records_deleted: int
    records_unchanged: int
    elapsed: float                  # seconds
    hosts_parked: int               # hosts parked by rate limits at some point during the run

    @property
    def repos_failed(self) -> int:
        return sum(self.failed.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "repos_ok": self.repos_ok,
            "repos_failed": self.repos_failed,
            "failed": dict(sorted(self.failed.items())),
            "records": {
                "added": self.records_added,
                "updated": self.records_updated,
                "deleted": self.records_deleted,
                "unchanged": self.records_unchanged,
            },
            "elapsed_s": round(self.elapsed, 3),
            "hosts_parked": self.hosts_parked,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackfillSummary:
        records = data["records"]
        return cls(
            repos_ok=data["repos_ok"], failed=dict(data["failed"]), records_added=records["added"],
            records_updated=records["updated"], records_deleted=records["deleted"],
            records_unchanged=records["unchanged"], elapsed=data["elapsed_s"], hosts_parked=data["hosts_parked"],
        )


@dataclass(slots=True)
class _Tally:
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    added: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    parked: set[str] = field(default_factory=set)

    def fail(self, outcome: str) -> None:
        self.failed[outcome] = self.failed.get(outcome, 0) + 1

    def summary(self, elapsed: float) -> BackfillSummary:
        return BackfillSummary(
            repos_ok=self.ok, failed=dict(self.failed), records_added=self.added, records_updated=self.updated,
            records_deleted=self.deleted, records_unchanged=self.unchanged, elapsed=elapsed,
            hosts_parked=len(self.parked),
        )


def backoff(attempts: int, *, base: timedelta, cap: timedelta) -> timedelta:
    """Jittered exponential backoff: attempt 1 -> about `base`, doubling up to `cap` (50-100 %)."""
    return timedelta(seconds=backoff_delay(attempts - 1, base=base.total_seconds(), cap=cap.total_seconds()))


def recover_queue(store: Store) -> int:
    """Hand queue rows left 'in_progress' by a process that died back to 'pending' (call at start-up)."""
    rows = store.fetchall("SELECT count(*) FROM backfill_queue WHERE state = ?", [QueueState.IN_PROGRESS.value])
    store.execute_write(
        "UPDATE backfill_queue SET state = ?, updated_at = ? WHERE state = ?",
        [QueueState.PENDING.value, datetime.now(UTC), QueueState.IN_PROGRESS.value],
    )
    return int(rows[0][0])


class _Deferred(Exception):
    def __init__(self, retry_at: float, host: str | None) -> None:
        self.retry_at = retry_at
        self.host = host


class Backfiller:
    """Backfills DIDs concurrently: `config.concurrency` repos in flight, host limits in the client."""

    def __init__(
        self,
        store: Store,
        resolver: Resolver,
        client: PdsClient,
        sink: Reconciler,
        *,
        config: BackfillConfig,
        progress: bool | None = None,
    ) -> None:
        self.store = store
        self.resolver = resolver
        self.client = client
        self.sink = sink
        self.config = config
        # a progress bar only on a terminal (never in logs or under tests)
        self._progress = sys.stderr.isatty() if progress is None else progress
        self._work = asyncio.Semaphore(config.concurrency)
        self._parked_seen: set[str] = set()

    # -- entry points ------------------------------------------------------------------------

    async def run(self, dids: Iterable[str]) -> BackfillSummary:
        """Backfill these DIDs (terminal ones included: naming a DID is an explicit request)."""
        tally = _Tally()
        started = time.monotonic()
        async with self._display(tally) as tick:
            await self._drive(dids, tally, tick, defer=False)
        return tally.summary(time.monotonic() - started)

    async def run_queue(self) -> BackfillSummary:
        """Claim pending queue rows whose retry_after has passed, in chunks, until none is due."""
        tally = _Tally()
        started = time.monotonic()
        async with self._display(tally) as tick:
            while True:
                claimed = await asyncio.to_thread(self._claim, _QUEUE_CLAIM)
                if not claimed:
                    break
                await self._drive(claimed, tally, tick, defer=True)
        return tally.summary(time.monotonic() - started)

    def _claim(self, limit: int) -> list[str]:
        now = datetime.now(UTC)
        rows: list[str] = []

        def claim(con: Any) -> None:
            rows.extend(
                r[0]
                for r in con.execute(
                    "UPDATE backfill_queue SET state = ?, updated_at = ? WHERE did IN ("
                    "  SELECT did FROM backfill_queue WHERE state = ? AND (retry_after IS NULL OR retry_after <= ?)"
                    "  ORDER BY enqueued_at, did LIMIT ?) RETURNING did",
                    [QueueState.IN_PROGRESS.value, now, QueueState.PENDING.value, now, limit],
                ).fetchall()
            )

        self.store._txn(claim)  # noqa: SLF001 - a claim must be one statement in one transaction
        return rows

    async def _drive(self, dids: Iterable[str], tally: _Tally, tick: Any, *, defer: bool) -> None:
        # Bounded: at most 4x concurrency tasks exist; the producer waits for room.
        room = asyncio.Semaphore(self.config.concurrency * 4)
        tasks: set[asyncio.Task[None]] = set()

        async def one(did: str) -> None:
            try:
                await self._backfill_one(did, tally, defer=defer)
            finally:
                room.release()
                tick()

        for did in dids:
            await room.acquire()
            task = asyncio.create_task(one(did))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    # -- one DID -----------------------------------------------------------------------------

    async def _backfill_one(self, did: str, tally: _Tally, *, defer: bool) -> None:
        give_up_at: float | None = None  # list mode: the end of this DID's rate-limit patience
        while True:
            try:
                async with self._work:
                    counts = await self._attempt(did, give_up_at)
            except _Deferred as d:
                if defer:
                    await self._record_deferred(did, d, tally, queue_only=True)
                    return
                # list mode: wait out the park without holding a work slot, then go again,
                # as long as the park ends within the patience counted from the first one
                now = time.time()
                if give_up_at is None:
                    give_up_at = now + self.config.rate_limit_patience.total_seconds()
                if d.retry_at > give_up_at:
                    await self._record_deferred(did, d, tally, queue_only=False)
                    return
                await asyncio.sleep(max(0.0, d.retry_at - now))
                continue
            except _Outcome as o:
                await self._record_failure(did, o, tally)
                return
            except Exception as exc:  # a bug must not strand the DID 'in_progress' or stop the run
                log.exception("backfill crashed", extra={"ctx": {"did": did}})
                await self._record_failure(did, _Outcome(BackfillStatus.RETRYING, f"internal: {exc!r}"), tally)
                return
            tally.ok += 1
            tally.added += counts.added
            tally.updated += counts.updated
            tally.deleted += counts.deleted
            tally.unchanged += counts.unchanged
            metrics.BACKFILL_REPOS.labels(outcome="ok").inc()
            for change, n in (("added", counts.added), ("updated", counts.updated), ("deleted", counts.deleted)):
                if n:
                    metrics.BACKFILL_RECORDS.labels(change=change).inc(n)
            return

    async def _attempt(self, did: str, give_up_at: float | None = None) -> ReconcileCounts:
        """One try. Raises _Outcome (what to record) or _Deferred (rate limited)."""
        identity = await self._resolve(did, fresh=False)
        await self.sink.begin(did)
        committed = False
        try:
            snapshot = await self._fetch_and_parse(did, identity, give_up_at)
            try:
                counts = await self.sink.commit(did, snapshot)
            except SkyfillError as exc:
                raise _Outcome(BackfillStatus.RETRYING, f"storing failed: {exc}") from exc
            committed = True
            return counts
        finally:
            if not committed:
                await self.sink.abort(did)

    async def _resolve(self, did: str, *, fresh: bool) -> ResolvedIdentity:
        try:
            return await self.resolver.resolve(did, fresh=fresh)
        except IdentityError as exc:
            if exc.terminal and isinstance(exc.__cause__, UnsafeHostError):
                # the document names a PDS the host guard refuses (e.g. http://0177.0.0.1)
                raise _Outcome(BackfillStatus.UNSAFE_HOST, str(exc)) from exc
            if exc.terminal:
                raise _Outcome(BackfillStatus.INVALID_DID_DOC, str(exc)) from exc
            raise _Outcome(BackfillStatus.RETRYING, f"identity: {exc}") from exc
        except UnsafeHostError as exc:
            raise _Outcome(BackfillStatus.UNSAFE_HOST, str(exc)) from exc

    def _key(self, identity: ResolvedIdentity) -> PublicKey | None:
        if not self.config.verify:
            return None
        try:
            return parse_public_key(identity.signing_key)
        except (IdentityError, ValueError) as exc:
            raise _Outcome(BackfillStatus.INVALID_DID_DOC, f"signing key: {exc}") from exc

    async def _fetch_and_parse(self, did: str, identity: ResolvedIdentity, give_up_at: float | None) -> RepoSnapshot:
        car = await self._get_repo(did, identity.pds, give_up_at)
        try:
            return await self._parse(did, car, self._key(identity), hint=True)
        except SignatureError as first:
            # The key may have rotated since the document was cached: re-resolve once.
            fresh = await self._resolve(did, fresh=True)
            if fresh.pds != identity.pds:
                car = await self._get_repo(did, fresh.pds, give_up_at)
            try:
                return await self._parse(did, car, self._key(fresh))
            except SignatureError as exc:
                raise _Outcome(BackfillStatus.SIGNATURE_FAILED, str(exc)) from first

    async def _get_repo(self, did: str, pds: str, give_up_at: float | None) -> bytes:
        now = time.time()
        deadline = now + min(_HOST_PATIENCE, self.config.rate_limit_patience.total_seconds())
        if give_up_at is not None:
            deadline = min(deadline, give_up_at)
        try:
            return await self.client.get_repo(pds, did, deadline=deadline)
        except TerminalFetchError as exc:
            try:
                status = BackfillStatus(exc.outcome)
            except ValueError:
                status = BackfillStatus.FAILED
            raise _Outcome(status, str(exc)) from exc
        except UnsafeHostError as exc:
            raise _Outcome(BackfillStatus.UNSAFE_HOST, str(exc)) from exc
        except RateLimited as exc:
            self._note_parked()
            raise _Deferred(exc.retry_at, exc.host) from exc
        except RetryableFetchError as exc:
            raise _Outcome(BackfillStatus.RETRYING, str(exc)) from exc
        except RepoError as exc:
            if exc.kind == "too_large":
                raise _Outcome(BackfillStatus.FAILED, str(exc)) from exc
            raise _Outcome(BackfillStatus.RETRYING, str(exc)) from exc
        finally:
            self._note_parked()

    async def _parse(self, did: str, car: bytes, key: PublicKey | None, *, hint: bool = False) -> RepoSnapshot:
        # CPU-bound (hashing, MST walk, signature): off the event loop. When the stored root is
        # one reconcile will trust, the walk is deferred (an unchanged repo never needs it).
        def run() -> RepoSnapshot:
            root = self.store.trusted_root(did) if hint and getattr(self.sink, "trusts_data_root", False) else None
            return parse_repo(car, did=did, key=key, defer_walk_if_data=root)

        try:
            return await asyncio.to_thread(run)
        except SignatureError:
            raise
        except RepoError as exc:
            # missing_block = a CAR cut at a block boundary; a bad hash or a broken node may be a
            # damaged transfer too. None of these is proof the repo is gone: retry with backoff.
            raise _Outcome(BackfillStatus.RETRYING, f"{exc.kind}: {exc}") from exc

    # -- bookkeeping -------------------------------------------------------------------------

    def _note_parked(self) -> None:
        parked = self.client.parked_hosts()
        metrics.BACKFILL_HOSTS_PARKED.set(len(parked))
        self._parked_seen.update(parked)

    async def _record_failure(self, did: str, outcome: _Outcome, tally: _Tally) -> None:
        status, error = outcome.status, outcome.message
        retry_after: datetime | None = None
        if status is BackfillStatus.RETRYING:
            attempts = await asyncio.to_thread(self._attempts, did)
            if attempts + 1 >= self.config.max_attempts:
                status = BackfillStatus.FAILED
                error = f"gave up after {attempts + 1} attempts: {error}"
            else:
                retry_after = datetime.now(UTC) + backoff(
                    attempts + 1, base=self.config.backoff_min, cap=self.config.backoff_max
                )
        log.warning("backfill failed", extra={"ctx": {"did": did, "status": status.value, "error": error}})
        tally.fail(status.value)
        metrics.BACKFILL_REPOS.labels(outcome=status.value).inc()
        try:
            await asyncio.to_thread(
                self.store.record_backfill_failure, did, status=status, error=error[:2000], retry_after=retry_after
            )
        except SkyfillError:
            log.exception("could not record a backfill failure", extra={"ctx": {"did": did}})

    def _attempts(self, did: str) -> int:
        rows = self.store.fetchall("SELECT backfill_attempts FROM repos WHERE did = ?", [did])
        return int(rows[0][0]) if rows else 0

    async def _record_deferred(self, did: str, d: _Deferred, tally: _Tally, *, queue_only: bool) -> None:
        """The host stays parked past our patience: due again at the park's end.

        Rate limiting is the host's state, not the DID's: no attempt is counted. Queue mode
        writes only the queue row (the queue hands the DID out again once due); list mode has
        no queue to come back to, so the repo row says 'retrying' until the park's end.
        """
        retry_after = datetime.fromtimestamp(d.retry_at, UTC)
        error = f"rate limited: host {d.host} parked until {retry_after.isoformat(timespec='seconds')}"
        # list mode gives up on the DID (a warning); queue mode merely reschedules it (info:
        # a daemon round may defer thousands of DIDs of one parked host)
        log.log(
            logging.INFO if queue_only else logging.WARNING,
            "backfill deferred",
            extra={"ctx": {"did": did, "host": d.host, "retry_after": retry_after.isoformat(timespec="seconds"),
                           "mode": "queue" if queue_only else "list"}},
        )
        tally.fail("deferred")
        metrics.BACKFILL_REPOS.labels(outcome="deferred").inc()
        try:
            await asyncio.to_thread(self._defer, did, retry_after, None if queue_only else error)
        except SkyfillError:
            log.exception("could not record a deferred backfill", extra={"ctx": {"did": did}})

    def _defer(self, did: str, retry_after: datetime, error: str | None) -> None:
        now = datetime.now(UTC)
        self.store.execute_write(
            "UPDATE backfill_queue SET state = ?, retry_after = ?, updated_at = ? WHERE did = ?",
            [QueueState.PENDING.value, retry_after, now, did],
        )
        if error is not None:
            self.store.execute_write(
                "INSERT INTO repos (did, first_seen_at, backfill_status, backfill_error, backfill_attempts, "
                "backfill_retry_after) VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT (did) DO UPDATE SET "
                "backfill_status = excluded.backfill_status, backfill_error = excluded.backfill_error, "
                "backfill_retry_after = excluded.backfill_retry_after",
                [did, now, BackfillStatus.RETRYING.value, error, retry_after],
            )

    # -- progress ----------------------------------------------------------------------------

    @asynccontextmanager
    async def _display(self, tally: _Tally) -> AsyncIterator[Any]:
        self._parked_seen = set()
        if not self._progress:
            try:
                yield lambda: None
            finally:
                tally.parked |= self._parked_seen
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("backfill"),
            BarColumn(),
            TextColumn("{task.completed} repos  {task.fields[records]} records  {task.fields[parked]} hosts parked"),
            TimeElapsedColumn(),
            transient=False,
        ) as bar:
            task = bar.add_task("repos", total=None, records=0, parked=0)

            def tick() -> None:
                done = tally.ok + sum(tally.failed.values())
                records = tally.added + tally.updated + tally.deleted + tally.unchanged
                bar.update(task, completed=done, records=records, parked=len(self.client.parked_hosts()))

            try:
                yield tick
            finally:
                tally.parked |= self._parked_seen


@asynccontextmanager
async def open_backfiller(
    store: Store, *, config: BackfillConfig, sink: Reconciler | None = None, progress: bool | None = None
) -> AsyncIterator[Backfiller]:
    """The one place a Backfiller is wired: guarded client, caching resolver, sink (StoreReconciler default)."""
    client = PdsClient(
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        min_transfer_bytes=config.min_transfer_bytes,
        transfer_window=config.transfer_window,
        deadline_base=config.request_deadline_base,
        deadline_rate=config.request_deadline_rate,
        max_car_bytes=config.max_car_bytes,
        per_host_rps=config.per_host_rps,
        per_host_concurrency=config.per_host_concurrency,
        global_concurrency=config.concurrency,
        max_retries=config.request_retries,
        backoff_base=config.request_backoff,
        allow_private_hosts=config.allow_private_hosts,
        rate_limit_patience=config.rate_limit_patience.total_seconds(),
        max_park=config.max_park.total_seconds(),
        # the PLC directory is trusted by the Resolver, for its own requests only
    )
    resolver = Resolver(
        plc_url=config.plc_url, ttl=config.identity_ttl.total_seconds(), client=client, store=store
    )
    try:
        yield Backfiller(store, resolver, client, sink or StoreReconciler(store), config=config, progress=progress)
    finally:
        await resolver.aclose()
        await client.aclose()


class _Outcome(Exception):
    def __init__(self, status: BackfillStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


assert BackfillStatus.RETRYING not in TERMINAL_BACKFILL
