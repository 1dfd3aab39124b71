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
Every queue and outcome write is a named transition of skyfill.storage.queue (the retry
counter and backoff included); where a snapshot goes is backfill/reconcile.py.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sized
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from skyfill import metrics
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
from skyfill.net.http import host_key
from skyfill.net.identity import ResolvedIdentity, Resolver
from skyfill.net.pds import PdsClient
from skyfill.protocol.crypto import PublicKey, parse_public_key
from skyfill.protocol.repo import RepoSnapshot, parse_repo
from skyfill.storage import TERMINAL_BACKFILL, BackfillStatus, ReconcileCounts, RetryPolicy, Store

from .config import BackfillConfig
from .outcomes import record_deferred, record_failure
from .progress import BackfillSummary, Phases, Tally, report
from .queue_run import chunks, hosts_of, work_queue
from .reconcile import Reconciler, StoreReconciler

__all__ = ["Backfiller", "BackfillSummary", "Reconciler", "StoreReconciler", "recover_queue", "open_backfiller"]

log = logging.getLogger(__name__)

# Wait at most this long (and never past the DID's rate-limit patience) for a parked host
# inside one request before deferring the DID instead.
_HOST_PATIENCE = 30.0
_QUEUE_CLAIM = 500


def recover_queue(store: Store) -> int:
    """Hand queue rows left 'in_progress' by a process that died back to 'pending' (call at start-up)."""
    return store.recover_queue()


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
        # progress bars only on a terminal (never in logs or under tests); else a log line every 30 s
        self._progress = sys.stderr.isatty() if progress is None else progress
        self._work = asyncio.Semaphore(config.concurrency)
        self._retry = RetryPolicy(config.max_attempts, config.backoff_min, config.backoff_max)
        self._parked_seen: set[str] = set()
        self._phases: Phases | None = None
        self.phases = Phases("identities", "repos")   # the current (or last) run's phases

    # -- entry points ------------------------------------------------------------------------

    async def run(self, dids: Iterable[str]) -> BackfillSummary:
        """Backfill these DIDs (terminal ones included: naming a DID is an explicit request)."""
        tally = Tally()
        started = time.monotonic()
        total = len(dids) if isinstance(dids, Sized) else None
        phases = Phases("identities", "repos", totals={"identities": total, "repos": total})
        async with self._session(tally, phases, count_resolves=True):
            await self._drive(dids, tally, phases, defer=False)
        return tally.summary(time.monotonic() - started)

    async def run_queue(self) -> BackfillSummary:
        """Backfill every due queue row, host-fairly (backfill/queue_run.py), until none is due."""
        tally = Tally()
        started = time.monotonic()
        patience = min(_HOST_PATIENCE, self.config.rate_limit_patience.total_seconds())
        due = await asyncio.to_thread(self.store.due_count)  # one pass, for the totals and ETAs
        phases = Phases("identities", "repos", totals={"identities": due, "repos": due})
        async with self._session(tally, phases, count_resolves=False):
            await work_queue(self, tally, phases, patience=patience)
        return tally.summary(time.monotonic() - started)

    async def backfill_did(self, did: str, tally: Tally, *, defer: bool, raise_parked: bool = False) -> bool:
        """One DID to its outcome (module docstring), counted in `tally`; True when backfilled."""
        return await self._backfill_one(did, tally, defer=defer, raise_parked=raise_parked)

    async def backfill_requested(self, did: str) -> str:
        """A Kafka worker's request (publish/worker.py): 'ok' or the outcome recorded; raises
        RateLimited, with nothing attempted or recorded, while the DID's host stays parked."""
        tally = Tally()
        ok = await self._backfill_one(did, tally, defer=False, raise_parked=True)
        return "ok" if ok else next(iter(tally.failed), "retrying")

    async def hosts_of(self, dids: list[str]) -> list[str]:
        return await hosts_of(self, dids)  # each DID's PDS host, for scheduling (queue_run.py)

    async def defer_parked(self, did: str, host: str, retry_after: datetime, tally: Tally) -> None:
        """A DID not attempted because `host` stays parked: due again at `retry_after`."""
        await self._record_deferred(did, _Deferred(retry_after.timestamp(), host), tally, queue_only=True)

    @asynccontextmanager
    async def _session(self, tally: Tally, phases: Phases, *, count_resolves: bool) -> AsyncIterator[None]:
        """One run: the hosts parked meanwhile go into `tally`; its phases shown (progress.report).
        `count_resolves`: the identities phase counts each DID's first resolve (list mode; a
        queue run counts the hosts it resolves before scheduling)."""
        self._parked_seen = set()
        self.phases = phases
        self._phases = phases if count_resolves else None

        def extra() -> dict[str, Any]:
            return {"ok": tally.ok, "failed": sum(tally.failed.values()), "hosts_parked": len(self.client.parked_hosts()),
                    "records": tally.added + tally.updated + tally.deleted + tally.unchanged}

        started = time.monotonic()
        try:
            async with report(phases, what="backfill", terminal=self._progress, extra=extra):
                yield
        finally:
            tally.parked |= self._parked_seen
            self._phases = None
            if tally.ok or tally.failed:  # a daemon round that found nothing due stays quiet
                log.info("backfill finished", extra={"ctx": tally.summary(time.monotonic() - started).to_json()})

    async def _drive(self, dids: Iterable[str], tally: Tally, phases: Phases, *, defer: bool) -> None:
        # Bounded: at most 4x concurrency tasks exist; the producer waits for room.
        room = asyncio.Semaphore(self.config.concurrency * 4)
        tasks: set[asyncio.Task[None]] = set()

        async def one(did: str) -> None:
            try:
                await self._backfill_one(did, tally, defer=defer)
            finally:
                room.release()
                phases["repos"].advance()

        ttl = self.config.identity_ttl.total_seconds()
        for chunk in chunks(dids, _QUEUE_CLAIM):
            # the bulk identities (`identities sync`) of the chunk in one read, not one per DID
            await asyncio.to_thread(self.store.prefetch_identities, chunk, max_age=ttl)
            for did in chunk:
                await room.acquire()
                task = asyncio.create_task(one(did))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    # -- one DID -----------------------------------------------------------------------------

    async def _backfill_one(self, did: str, tally: Tally, *, defer: bool, raise_parked: bool = False) -> bool:
        give_up_at: float | None = None  # list mode: the end of this DID's rate-limit patience
        while True:
            try:
                async with self._work:
                    counts, host = await self._attempt(did, give_up_at)
            except _Deferred as d:
                if raise_parked:
                    raise RateLimited(f"host {d.host} parked", retry_at=d.retry_at, did=did, host=d.host) from None
                if defer:
                    await self._record_deferred(did, d, tally, queue_only=True)
                    return False
                # list mode: wait out the park without holding a work slot, then go again,
                # as long as the park ends within the patience counted from the first one
                now = time.time()
                if give_up_at is None:
                    give_up_at = now + self.config.rate_limit_patience.total_seconds()
                if d.retry_at > give_up_at:
                    await self._record_deferred(did, d, tally, queue_only=False)
                    return False
                await asyncio.sleep(max(0.0, d.retry_at - now))
                continue
            except _Outcome as o:
                await self._record_failure(did, o, tally)
                return False
            except Exception as exc:  # a bug must not strand the DID 'in_progress' or stop the run
                log.exception("backfill crashed", extra={"ctx": {"did": did}})
                await self._record_failure(did, _Outcome(BackfillStatus.RETRYING, f"internal: {exc!r}"), tally)
                return False
            # success: debug only (a network backfill has millions); failures are warnings
            log.debug("backfilled", extra={"ctx": {"did": did, "host": host, "added": counts.added,
                                                   "updated": counts.updated, "deleted": counts.deleted}})
            tally.ok += 1
            tally.added += counts.added
            tally.updated += counts.updated
            tally.deleted += counts.deleted
            tally.unchanged += counts.unchanged
            metrics.BACKFILL_REPOS.labels(outcome="ok").inc()
            for change, n in (("added", counts.added), ("updated", counts.updated), ("deleted", counts.deleted)):
                if n:
                    metrics.BACKFILL_RECORDS.labels(change=change).inc(n)
            return True

    async def _attempt(self, did: str, give_up_at: float | None = None) -> tuple[ReconcileCounts, str]:
        """One try: the counts and the PDS host. Raises _Outcome (what to record; its host set once
        the DID is resolved) or _Deferred (rate limited)."""
        try:
            identity = await self._resolve(did, fresh=False)
        finally:
            if self._phases is not None and give_up_at is None:  # the DID's first resolve of this run
                self._phases["identities"].advance()
        host = host_key(identity.pds)
        await self.sink.begin(did)
        committed = False
        try:
            snapshot = await self._fetch_and_parse(did, identity, give_up_at)
            try:
                counts = await self.sink.commit(did, snapshot)
            except SkyfillError as exc:
                raise _Outcome(BackfillStatus.RETRYING, f"storing failed: {exc}") from exc
            committed = True
            return counts, host
        except _Outcome as o:
            o.host = o.host or host
            raise
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

    async def _record_failure(self, did: str, outcome: _Outcome, tally: Tally) -> None:
        await record_failure(self.store, did, outcome.status, outcome.message, tally, self._retry, host=outcome.host)

    async def _record_deferred(self, did: str, d: _Deferred, tally: Tally, *, queue_only: bool) -> None:
        await record_deferred(self.store, did, d.retry_at, d.host, tally, queue_only=queue_only)


@asynccontextmanager
async def open_backfiller(
    store: Store, *, config: BackfillConfig, sink: Reconciler | None = None, progress: bool | None = None
) -> AsyncIterator[Backfiller]:
    """The one place a Backfiller is wired: guarded client, caching resolver, sink (StoreReconciler default)."""
    client = PdsClient(
        transfer=config.transfer(),
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
        sink = sink or StoreReconciler(store, collections=config.collections)
        yield Backfiller(store, resolver, client, sink, config=config, progress=progress)
    finally:
        await resolver.aclose()
        await client.aclose()


class _Outcome(Exception):
    def __init__(self, status: BackfillStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.host: str | None = None   # the DID's PDS host, once resolved


assert BackfillStatus.RETRYING not in TERMINAL_BACKFILL
