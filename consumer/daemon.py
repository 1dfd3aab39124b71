"""The consumer daemon: firehose bytes -> typed events -> per-DID state -> DuckDB, durably.

Cursor rule: the stored cursor moves only inside the DuckDB transaction that stores the
effects of every event up to it (storage.Store.apply). Batches are sealed in the event loop
and written by a worker thread while the next batch fills; at most one write is in flight.
When Kafka publishing is on, a batch is written only after the broker acknowledged all its
changes, so neither the cursor nor the mirror ever runs ahead of the topics.

Worked example (kill -9 safety): events 100..180 are processed, batch A (100..150) is
committed with cursor 150, batch B (151..180) is being written when the process dies.
On restart the tracker is rebuilt from `repos` (state as of 150) and the stream resumes at
cursor 150: events 151..180 are applied again on the same state, giving the same rows.

The cursor never moves backwards within a coverage span: an event or a bad frame whose seq is
not above the last one processed is skipped without moving it (a garbled frame claiming seq 3
after seq 79,000 is counted, not obeyed), and a seq outside BIGINT is a bad frame. Only a
FutureCursor restart from the live head moves it back, and that opens a new span.

Storage failures are operator events, never a silent stall. When a batch write fails:
- the failure is logged once as one structured line (`storage write failed`, with the cause,
  its kind and the cursor), then every 60 s while it lasts (`storage still failing`);
  `skyfill_store_healthy` is 0 and `skyfill_storage_errors_total{kind}` counts each attempt;
- the SAME sealed batch is retried with capped exponential backoff (0.5 s doubling to 30 s);
  nothing is dropped and nothing is written out of order. Meanwhile the stream is not read
  (backpressure), so `skyfill_firehose_lag_seconds` keeps growing and the stored cursor stays
  at the last durable batch;
- when a retry succeeds (space returned), the daemon logs `storage recovered`, sets the gauge
  back to 1 and carries on by itself, in the same coverage span (no event was skipped);
- a database DuckDB has invalidated (a fatal error, e.g. a checkpoint that hit the full disk)
  cannot be written again in this process: the daemon stops and `skyfill consume` exits 4
  with a one-line message, the coverage span ends `error` (written on a fresh connection),
  the cursor stays at the last durable batch, and a restart (a supervisor's) resumes from
  there once the disk has room;
- SIGTERM/SIGINT during an outage makes one last attempt; if it fails the daemon exits 4 the
  same way (the unwritten events are read again from the stored cursor).
A write that failed for good stops everything after it (no later batch may be written, or
the cursor would pass the lost one). A span whose end cannot be written (the disk is still
full) is closed as `crashed` by the next start.

Disk full, in practice: DuckDB appends every COMMIT to the WAL and checkpoints it into the
database file past CHECKPOINT_THRESHOLD (64 MB). With less free space than that, the WAL is
what fills the disk; its COMMIT fails and leaves the database usable, so the retry above
resumes as soon as space returns. A checkpoint that hits a full disk (a WAL past the threshold,
or one replayed at start-up) is fatal to the open database: exit and restart, as above. Freeing
space by deleting skyfill's own files is never safe; give the filesystem room instead.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from skyfill import metrics
from skyfill.protocol.crypto import PublicKey
from skyfill.errors import FrameError, FutureCursorError, IdentityError, StorageError
from skyfill.protocol.syntax import collection_matcher
from skyfill.storage import Batch, CoverageEnd, CoverageSpan, Publish, Store
from skyfill.storage import failure_kind

from .changes import changes_for
from .connection import source_name, stream_frames
from skyfill.protocol.events import Account, Commit, Identity, Info, StreamError, Sync
from skyfill.protocol.frames import parse_frame
from .resync import Captures
from .tracker import Tracker, Verdict

from .verify import CheckResult, CommitVerifier, check_frame

# A chunk item's key, or why it has none (IdentityError), or None: a frame not checked.
_Key = PublicKey | IdentityError | None

__all__ = ["ConsumeConfig", "Daemon"]

log = logging.getLogger(__name__)

# A seq is stored as BIGINT: a frame claiming more is bad input, not a batch that can never be written.
_MAX_SEQ = 2**63 - 1
_RETRY_FIRST = 0.5      # seconds before the first retry of a failed batch write ...
_RETRY_MAX = 30.0       # ... doubling up to this
_REMIND_EVERY = 60.0    # while writes keep failing, log a reminder this often


@dataclass(frozen=True, slots=True)
class ConsumeConfig:
    relay: str = "wss://bsky.network"
    cursor: int | None = None               # overrides the stored cursor
    collections: tuple[str, ...] = ()
    strict_cursor: bool = False
    batch_events: int = 5000                # seal a batch after this many events ...
    flush_interval: float = 0.5             # ... or this many seconds
    publish: bool = False                   # keep the unreduced change log for a publisher




class Daemon:
    def __init__(
        self, store: Store, config: ConsumeConfig, *, publish: Publish | None = None,
        verifier: CommitVerifier | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.source = source_name(config.relay)
        self._publish = publish
        self._verifier = verifier
        self._want = collection_matcher(config.collections) if config.collections else None
        self.tracker = Tracker(store.load_repos(), want=self._want)
        stored = store.load_cursor(self.source)
        self.last_seq: int | None = config.cursor if config.cursor is not None else stored
        # The cursor is exclusive, but the reference PDS can send the event AT the cursor again
        # right after a resume at its head (its outbox starts with lastSeen = -1): drop it.
        self.tracker.stream_seq = self.last_seq
        self.last_time: str | None = None
        self.stop_event = asyncio.Event()
        self.flush_lock = asyncio.Lock()
        self._batch = self._new_batch()
        self._batch_started = time.monotonic()
        self._inflight: asyncio.Future[None] | None = None
        # A batch write that failed for good (an invalidated database, a stop during an outage, a
        # publish refused): its events are lost from memory, so nothing may be written after it,
        # or the cursor would pass them. The daemon stops and the next run reads them again.
        self._failed: BaseException | None = None
        self._invalidated = False
        self._dead = asyncio.Event()
        self._span: CoverageSpan | None = None
        self._restart_from_head = False
        self._reconnect = False
        self.captures = Captures()  # commits racing an in-daemon backfill (consumer/resync.py)
        self.committed_seq: int | None = stored
        self.counts: dict[str, int] = {}
        # Per-event counters are summed here and added to Prometheus once per batch or tick
        # (_export_counts): a labelled .inc() per event cost more than the tracker.
        self._seen_types: dict[str, int] = {}
        self._seen_verdicts: dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
        self._span = CoverageSpan(id=await asyncio.to_thread(self.store.start_coverage, self.source))
        log.info("consuming", extra={"ctx": {"source": self.source, "cursor": self.last_seq,
                                              "repos": len(self.tracker.rows)}})
        metrics.STORE_HEALTHY.set(1)
        if self.committed_seq is not None:
            metrics.STORAGE_COMMITTED_SEQ.set(self.committed_seq)
        ended = CoverageEnd.ERROR
        drained = False
        ticker = asyncio.create_task(self._tick())
        consume = asyncio.create_task(self._consume())
        stopper = asyncio.create_task(self.stop_event.wait())
        dead = asyncio.create_task(self._dead.wait())
        try:
            done, _ = await asyncio.wait({consume, stopper, dead}, return_when=asyncio.FIRST_COMPLETED)
            if consume in done:
                consume.result()  # re-raise a fatal error (e.g. strict cursor)
            else:
                consume.cancel()
                try:
                    await consume
                except asyncio.CancelledError:
                    pass
            await _cancelled(ticker)  # no timed flush may race the drain
            if self._failed is not None:
                raise self._failed
            drained = True  # from here a failure is the drain's own: do not drain again
            await self._drain()
            ended = CoverageEnd.CLEAN
        finally:
            await _cancelled(ticker)
            stopper.cancel()
            dead.cancel()
            try:
                if not drained and self._failed is None:
                    await self._drain()  # store what was processed before the error (e.g. strict cursor)
            finally:
                await self._end_span(ended)
                if install_signal_handlers:
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        loop.remove_signal_handler(sig)
                log.info("stopped", extra={"ctx": {"cursor": self.committed_seq, "ended": ended.value}})

    async def _end_span(self, ended: CoverageEnd) -> None:
        assert self._span is not None
        try:
            if self._invalidated:
                await asyncio.to_thread(self.store.reconnect)
            await asyncio.to_thread(self.store.end_coverage, self._span.id, ended)
        except StorageError as exc:
            log.error("could not close the coverage span; the next start marks it crashed",
                      extra={"ctx": {"span": self._span.id, "ended": ended.value, "error": str(exc)}})

    async def _consume(self) -> None:
        if self._verifier is not None:
            seeded = await self._verifier.seed()
            log.info("verifying commits", extra={"ctx": {"keys_from_store": seeded}})
        while not self.stop_event.is_set():
            self._reconnect = False
            if self._verifier is not None:
                await self._consume_verified(self._verifier)
                if self._restart_from_head:
                    await self._begin_new_span()
                continue
            frames = stream_frames(self.config.relay, lambda: self.last_seq, stop=self.stop_event)
            try:
                async for data in frames:
                    self._handle(data)
                    # Either bound seals the batch; the write overlaps the next batch's parsing.
                    # _flush first waits for the write in flight, so memory stays bounded
                    # (one batch filling, one being written) and the reader slows to the writer.
                    # (A bound on records + events made nearly every 5,000-event batch of
                    # ~1 record/event take the waiting path: parse and write never overlapped.)
                    batch = self._batch
                    if batch.events >= self.config.batch_events or len(batch.records) >= self.config.batch_events:
                        await self._flush(wait=False)
                    if self._reconnect:
                        break
            finally:
                await frames.aclose()
            if self._restart_from_head:
                await self._begin_new_span()

    async def _tick(self) -> None:
        """Timed flushes and gauges. It never waits for a write in flight (a write retrying through
        an outage must not freeze the gauges) and never dies: a failure is logged and it goes on."""
        next_gauge = 0.0
        while True:
            await asyncio.sleep(self.config.flush_interval / 2)
            try:
                writing = self.flush_lock.locked() or (self._inflight is not None and not self._inflight.done())
                if (not writing and self._batch.events
                        and time.monotonic() - self._batch_started >= self.config.flush_interval):
                    await self._flush(wait=False)
                self._export_counts()
                if self.last_time:
                    metrics.FIREHOSE_LAG.set(max(0.0, time.time() - _epoch(self.last_time)))
                if time.monotonic() >= next_gauge and not self._invalidated:  # a column scan: every 10 s
                    next_gauge = time.monotonic() + 10
                    metrics.DESYNCHRONIZED_DIDS.set(await asyncio.to_thread(self.store.count_desynchronized))
            except asyncio.CancelledError:
                raise
            except StorageError:
                pass  # a failed write is logged where it happens (_store) and stops the daemon (run)
            except Exception as exc:  # a bug here must not stop timed flushes silently
                log.error("periodic flush failed", extra={"ctx": {"error": repr(exc)}})

    # -- events ---------------------------------------------------------------------------

    def _handle(self, data: bytes) -> None:
        """Parse and apply one frame (with --verify: every frame but #commit and #sync)."""
        try:
            event = parse_frame(data, want=self._want)
        except FrameError as exc:
            metrics.FIREHOSE_ERRORS.labels(exc.kind).inc()
            self.counts["error:" + exc.kind] = self.counts.get("error:" + exc.kind, 0) + 1
            log.warning("bad frame skipped", extra={"ctx": {"kind": exc.kind, "seq": exc.seq, "error": str(exc)}})
            if exc.seq is not None:
                self._skip(exc.seq, None)
            return
        if isinstance(event, StreamError):
            self._on_stream_error(event)
            return
        if isinstance(event, Info):
            metrics.FIREHOSE_EVENTS.labels("info").inc()
            log.warning("relay info", extra={"ctx": {"name": event.name, "message": event.message}})
            return
        self._apply(event)

    # -- verified ingest (--verify) -------------------------------------------------------
    #
    # A reader task parses frames into a bounded window (VERIFY_WINDOW frames) and asks the
    # verifier for the key of every #commit/#sync DID it has not seen, so keys are resolved
    # concurrently, thousands of frames ahead of their use. This task takes what the window
    # holds (up to VERIFY_CHUNK frames), waits for the keys the chunk lacks, has the chunk
    # checked in the verifier's worker process (or thread) while the reader keeps parsing,
    # then applies or rejects each event strictly in stream order. Nothing is
    # applied before its verdict, and the cursor only ever names applied or rejected events.
    # On reconnect the stream resumes after the last frame READ (read-ahead frames are still
    # applied); when an error frame makes this task reconnect, the window is dropped and the
    # stream resumes after the last frame applied.

    VERIFY_WINDOW = 2048
    VERIFY_CHUNK = 256
    VERIFY_DEPTH = 2      # chunks being checked at once

    async def _consume_verified(self, verifier: CommitVerifier) -> None:
        window: asyncio.Queue[tuple[Commit | Sync | None, bytes]] = asyncio.Queue(self.VERIFY_WINDOW)
        read_seq: int | None = None

        def resume_at() -> int | None:
            return read_seq if read_seq is not None else self.last_seq

        frames = stream_frames(self.config.relay, resume_at, stop=self.stop_event)

        async def read() -> None:
            nonlocal read_seq
            async for data in frames:
                try:
                    event = parse_frame(data, want=self._want)
                except FrameError as exc:
                    seq: int | None = exc.seq
                    event = None
                else:
                    seq = getattr(event, "seq", None)
                    if type(event) is Commit or type(event) is Sync:
                        verifier.want(event.did)
                    else:
                        event = None  # _handle parses it again: small frames, rare
                await window.put((event, data))  # type: ignore[arg-type]
                if seq is not None and (read_seq is None or seq > read_seq) and seq < 2**63:
                    read_seq = seq  # never backwards; never past what a cursor can say

        reader = asyncio.create_task(read())
        # Chunks whose checks were submitted, oldest first: the next chunk is checked while
        # this task applies the previous one, so the worker never waits for the applier.
        checking: deque[tuple[list[tuple[Commit | Sync | None, bytes]], list[_Key], asyncio.Future[list[CheckResult]]]]
        checking = deque()
        try:
            while True:
                if checking and (len(checking) >= self.VERIFY_DEPTH or window.empty()):
                    items, keys, verdicts = checking.popleft()
                    if not await self._apply_chunk(verifier, items, keys, await verdicts):
                        return  # reconnect requested by an error frame
                    continue
                getter = asyncio.ensure_future(window.get())
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    reader.result()  # the stream ended (stop) or failed: re-raise
                    return
                items = [getter.result()]
                while len(items) < self.VERIFY_CHUNK and not window.empty():
                    items.append(window.get_nowait())
                checking.append(await self._submit_chunk(verifier, items))
        finally:
            for _items, _keys, verdicts in checking:
                verdicts.cancel()
            reader.cancel()
            try:
                await reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - already raised above if it mattered
                pass
            await frames.aclose()

    async def _submit_chunk(
        self, verifier: CommitVerifier, items: list[tuple[Commit | Sync | None, bytes]]
    ) -> tuple[list[tuple[Commit | Sync | None, bytes]], list[_Key], asyncio.Future[list[CheckResult]]]:
        """Wait for the keys `items` need (most were resolved while they sat in the window),
        then start checking them; returns the items, their keys and the pending verdicts."""
        keys: list[_Key] = []
        jobs: list[tuple[bytes, PublicKey]] = []
        for event, data in items:
            if event is None:
                keys.append(None)
                continue
            key: PublicKey | IdentityError | None = verifier.cached(event.did)
            if key is None:
                try:
                    key = await verifier.key(event.did)
                except IdentityError as exc:
                    key = exc
            keys.append(key)
            if not isinstance(key, IdentityError):
                jobs.append((data, key))
        return items, keys, asyncio.ensure_future(verifier.check_many(jobs))

    async def _apply_chunk(
        self, verifier: CommitVerifier, items: list[tuple[Commit | Sync | None, bytes]], keys: list[_Key],
        results: list[CheckResult],
    ) -> bool:
        """Apply or reject `items` in order; False when an error frame asks for a reconnect."""
        verdicts = iter(results)
        for (event, data), key in zip(items, keys, strict=True):
            if event is None:
                self._handle(data)
            elif isinstance(key, IdentityError):
                self._reject(event, "unresolvable_did" if key.terminal else "identity_unavailable", str(key))
            else:
                verdict = next(verdicts)
                if verdict is not None and verdict[0] == "bad_signature":
                    verdict = await self._recheck(verifier, event, data, key, verdict)
                if verdict is None:
                    self._apply(event)
                elif verdict[0] == "unverifiable":
                    self.counts["unverifiable"] = self.counts.get("unverifiable", 0) + 1
                    metrics.FIREHOSE_UNVERIFIABLE.inc()
                    self._apply(event)
                else:
                    self._reject(event, verdict[0], verdict[1])
            batch = self._batch
            if batch.events >= self.config.batch_events or len(batch.records) >= self.config.batch_events:
                await self._flush(wait=False)
            if self._reconnect:
                return False
        return True

    async def _recheck(
        self, verifier: CommitVerifier, event: Commit | Sync, data: bytes, used: PublicKey, verdict: tuple[str, str]
    ) -> CheckResult:
        """A signature failure: the key may have rotated. Check again under the key known now
        if an earlier event of the chunk already refreshed it, else refresh the document once."""
        key = verifier.cached(event.did)
        if key is None or key == used:
            try:
                key = await verifier.refresh(event.did)
            except IdentityError:
                return verdict
            if key == used:
                return verdict
        return check_frame(data, key)

    def _reject(self, event: Commit | Sync, kind: str, reason: str) -> None:
        """Skip an event as bad input; the cursor still moves past it (the DID's chain then
        breaks on its next commit, so it is desynchronized and backfilled)."""
        metrics.FIREHOSE_ERRORS.labels(kind).inc()
        self.counts["error:" + kind] = self.counts.get("error:" + kind, 0) + 1
        log.warning("event skipped", extra={"ctx": {"kind": kind, "did": event.did, "seq": event.seq,
                                                    "rev": event.rev, "error": reason}})
        self._skip(event.seq, event.time)

    def _skip(self, seq: int, event_time: str | None) -> None:
        """Move past a skipped event, forward only: a seq at or below the last one processed (or
        outside BIGINT) leaves the cursor where it is."""
        stream_seq = self.tracker.stream_seq
        if (stream_seq is None or seq > stream_seq) and 0 <= seq <= _MAX_SEQ:
            self.tracker.stream_seq = seq
            self._advance(seq, event_time)

    def _apply(self, event: Commit | Sync | Identity | Account) -> None:
        if not 0 <= event.seq <= _MAX_SEQ:  # the parser refuses these too; a batch must never hold one
            metrics.FIREHOSE_ERRORS.labels("seq_range").inc()
            self.counts["error:seq_range"] = self.counts.get("error:seq_range", 0) + 1
            log.warning("bad frame skipped", extra={"ctx": {"kind": "seq_range", "seq": event.seq,
                                                            "error": "seq does not fit a signed 64-bit integer"}})
            return
        seen = self._seen_types
        name = _TYPE_NAMES.get(type(event), "other")
        seen[name] = seen.get(name, 0) + 1
        batch = self._batch
        verdict = self.tracker.apply(event, batch)
        value = verdict.value
        self.counts[value] = self.counts.get(value, 0) + 1
        seen = self._seen_verdicts
        seen[value] = seen.get(value, 0) + 1
        if verdict is Verdict.DESYNCHRONIZED:
            row = self.tracker.row(event.did)
            metrics.DESYNCHRONIZED.labels(row.desync_reason if row else "unknown").inc()
        if verdict in (Verdict.APPLIED, Verdict.DESYNCHRONIZED):
            capture = self.captures.active.get(event.did)
            if capture is not None:
                if isinstance(event, Commit):
                    capture.commits.append(event)
                if verdict is Verdict.DESYNCHRONIZED or isinstance(event, Sync):
                    capture.desynced = True
            if batch.changes is not None:
                batch.changes.extend(changes_for(event, self.tracker.row(event.did), self._want))
        if verdict is not Verdict.STALE_SEQ:
            self._advance(event.seq, event.time)

    def _advance(self, seq: int, event_time: str | None) -> None:
        batch = self._batch
        batch.events += 1
        batch.cursor = (self.source, seq)
        self.last_seq = seq
        span = batch.coverage
        if span is None:
            assert self._span is not None
            span = batch.coverage = CoverageSpan(id=self._span.id)
        if span.first_seq is None:
            span.first_seq = seq
        span.last_seq = seq
        if event_time is not None:
            self.last_time = event_time
            if span.first_event_at is None:
                span.first_event_at = event_time
            span.last_event_at = event_time

    def _on_stream_error(self, event: StreamError) -> None:
        metrics.FIREHOSE_EVENTS.labels("error").inc()
        if event.error == "FutureCursor":
            if self.config.strict_cursor:
                raise FutureCursorError(
                    f"the relay has no events after cursor {self.last_seq} (FutureCursor: {event.message}); "
                    "refusing to skip ahead because of --strict-cursor"
                )
            log.error(
                "cursor is ahead of the relay (FutureCursor); restarting from the live head",
                extra={"ctx": {"cursor": self.last_seq, "message": event.message}},
            )
            self._restart_from_head = True
        else:
            log.warning("relay error frame; reconnecting from the last processed event",
                        extra={"ctx": {"error": event.error, "message": event.message, "cursor": self.last_seq}})
        metrics.FIREHOSE_RECONNECTS.labels(event.error).inc()
        self._reconnect = True

    async def _begin_new_span(self) -> None:
        """After FutureCursor: seqs restart lower, so close this coverage span and open another."""
        await self._drain()
        assert self._span is not None
        await asyncio.to_thread(self.store.end_coverage, self._span.id, CoverageEnd.ERROR)
        self._span = CoverageSpan(id=await asyncio.to_thread(self.store.start_coverage, self.source))
        self.last_seq = None
        self.tracker.reset_stream()
        self._restart_from_head = False

    # -- writing --------------------------------------------------------------------------

    def _new_batch(self) -> Batch:
        batch = Batch()
        if self.config.publish:
            batch.changes = []
        return batch

    def _seal(self) -> Batch:
        batch = self._batch
        # The tracker keeps mutating its live rows; the batch must carry the state as of its cursor.
        batch.repos = {did: copy.copy(row) for did, row in batch.repos.items()}
        self._batch = self._new_batch()
        self._batch_started = time.monotonic()
        self._export_counts()
        return batch

    def _export_counts(self) -> None:
        for name, n in self._seen_types.items():
            metrics.FIREHOSE_EVENTS.labels(name).inc(n)
        for name, n in self._seen_verdicts.items():
            metrics.FIREHOSE_VERDICTS.labels(name).inc(n)
        self._seen_types.clear()
        self._seen_verdicts.clear()
        if self.last_seq is not None:
            metrics.FIREHOSE_LAST_SEQ.set(self.last_seq)

    async def _flush(self, *, wait: bool = True) -> None:
        """Seal the current batch and write it; with wait=False return once the write has started."""
        async with self.flush_lock:
            await self.settle_write()
            if self._failed is not None:
                raise self._failed
            if self._batch.is_empty():
                return
            batch = self._seal()
            self._inflight = asyncio.ensure_future(self._write(batch))
            # Its failure also lives in self._failed, which run() raises: nobody may need to await it.
            self._inflight.add_done_callback(_observed)
        if wait:
            await self._settle()

    async def _settle(self) -> None:
        async with self.flush_lock:
            await self.settle_write()

    async def settle_write(self) -> None:
        """Wait for the write in flight; the caller holds `flush_lock`.

        The write is shielded: cancelling the waiter (shutdown) leaves it running, to be waited
        for again by the drain. Once it is done it is cleared whatever its outcome, so a failed
        write raises here once, not in every later flush.
        """
        inflight = self._inflight
        if inflight is None:
            return
        try:
            await asyncio.shield(inflight)
        finally:
            if inflight.done():
                self._inflight = None

    async def _drain(self) -> None:
        await self._flush(wait=True)

    async def _write(self, batch: Batch) -> None:
        try:
            if self._publish is not None and batch.changes:
                await self._publish(batch.changes)
            started = time.perf_counter()
            await self._store(batch)
        except BaseException as exc:
            self._failed = exc
            self._dead.set()
            raise
        metrics.BATCH_WRITE_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_EVENTS.inc(batch.events)
        if batch.cursor is not None:
            self.committed_seq = batch.cursor[1]
            metrics.STORAGE_COMMITTED_SEQ.set(self.committed_seq)

    async def _store(self, batch: Batch) -> None:
        """Write one batch, retrying the same batch through a storage outage (see the module docstring)."""
        delay = _RETRY_FIRST
        attempts = 0
        failing_since = reminded = 0.0
        while True:
            try:
                await asyncio.to_thread(self.store.apply, batch)
            except StorageError as exc:
                attempts += 1
                kind = failure_kind(exc)
                metrics.STORAGE_ERRORS.labels(kind).inc()
                metrics.STORE_HEALTHY.set(0)
                cause = " ".join(str(exc).split())  # DuckDB messages span lines; a log line must not
                ctx = {"kind": kind, "error": cause, "cursor": self.committed_seq,
                       "batch_seqs": _seq_range(batch), "attempts": attempts}
                if kind == "invalidated":
                    self._invalidated = True
                    log.error("storage failed; stopping (restart to resume from the stored cursor)",
                              extra={"ctx": ctx})
                    raise StorageError(
                        f"the database was invalidated by a fatal storage error and cannot be written again "
                        f"in this process; restart to resume from cursor {self.committed_seq} ({cause})") from exc
                now = time.monotonic()
                if attempts == 1:
                    failing_since = reminded = now
                    log.error("storage write failed; retrying the batch with backoff, not reading the stream",
                              extra={"ctx": {**ctx, "retry_in": delay}})
                elif now - reminded >= _REMIND_EVERY:
                    reminded = now
                    log.error("storage still failing", extra={"ctx": {**ctx, "failing_for": round(now - failing_since)}})
                if self.stop_event.is_set():
                    raise StorageError(f"stopped while storage was failing ({kind}: {cause}); the events after "
                                       f"cursor {self.committed_seq} were not stored and are read again on restart"
                                       ) from exc
                try:  # a stop request cuts the wait short for one last attempt
                    await asyncio.wait_for(self.stop_event.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, _RETRY_MAX)
                continue
            if attempts:
                log.warning("storage recovered", extra={"ctx": {
                    "attempts": attempts + 1, "cursor": batch.cursor[1] if batch.cursor else self.committed_seq,
                    "failing_for": round(time.monotonic() - failing_since)}})
            metrics.STORE_HEALTHY.set(1)
            return


_TYPE_NAMES: dict[type, str] = {Commit: "commit", Sync: "sync", Identity: "identity", Account: "account"}


def _observed(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: no "Task exception was never retrieved" at exit


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def _seq_range(batch: Batch) -> tuple[int | None, int | None]:
    span = batch.coverage
    return (span.first_seq, span.last_seq) if span is not None else (None, None)


def _epoch(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return datetime.now(UTC).timestamp()
