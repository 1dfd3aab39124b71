"""The consumer daemon: firehose bytes -> typed events -> per-DID state -> DuckDB, durably.

Cursor rule: the stored cursor moves only inside the DuckDB transaction that stores the
effects of every event up to it (storage.Store.apply). Batches are sealed in the event loop
and written by the batch writer (consumer/writer.py) while the next batch fills; at most one
write is in flight, and with Kafka publishing on none is stored before the broker acknowledged it.

Worked example (kill -9 safety): events 100..180 are processed, batch A (100..150) is
committed with cursor 150, batch B (151..180) is being written when the process dies.
On restart the tracker reads rows from `repos` as DIDs come (state as of 150) and the stream resumes at
cursor 150: events 151..180 are applied again on the same state, giving the same rows.

The cursor never moves backwards within a coverage span: an event or a bad frame whose seq is
not above the last one processed is skipped without moving it (a garbled frame claiming seq 3
after seq 79,000 is counted, not obeyed), and a seq outside BIGINT is a bad frame. Only a
FutureCursor restart from the live head moves it back, and that opens a new span.

Storage failures (retry with backoff, health metrics, what stops the daemon) are handled by
the batch writer: see consumer/writer.py.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from skyfill import metrics
from skyfill.errors import FrameError, FutureCursorError, StorageError
from skyfill.protocol.events import Account, Commit, Identity, Info, StreamError, Sync
from skyfill.protocol.frames import parse_frame
from skyfill.protocol.syntax import collection_matcher
from skyfill.storage import Batch, CoverageEnd, CoverageSpan, Publish, Store

from .captures import Captures
from .changes import changes_for
from .config import ConsumeConfig
from .counters import EventCounters
from .connection import source_name, stream_frames
from .known_dids import KnownDids
from .tracker import Tracker, Verdict
from .verified import Verified, verified_frames
from .verify import CommitVerifier
from .writer import BatchWriter

__all__ = ["ConsumeConfig", "Daemon"]

log = logging.getLogger(__name__)

# The desynchronized-DIDs gauge scans the `repos` state (~1 s at 10M DIDs): every 10 s, or less
# often when a count takes longer, so that it takes at most ~1% of the daemon's time at any size.
_GAUGE_EVERY_S, _GAUGE_SHARE = 10.0, 0.01


def _gauge_pause(took: float) -> float:
    return max(_GAUGE_EVERY_S, took / _GAUGE_SHARE)


# A seq is stored as BIGINT: a frame claiming more is bad input, not a batch that can never be written.
_MAX_SEQ = 2**63 - 1


class Daemon:
    def __init__(
        self, store: Store, config: ConsumeConfig, *, publish: Publish | None = None,
        verifier: CommitVerifier | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.source = source_name(config.relay)
        self.publish = publish            # the Kafka publish callback, if any
        self._verifier = verifier
        # The collection filter (None: every collection is mirrored).
        self.want = collection_matcher(config.collections) if config.collections else None
        # a bounded cache of per-DID state, filled from the store on a miss (consumer/tracker.py)
        self.tracker = Tracker(want=self.want, load=store.repo_row, capacity=config.tracker_capacity,
                               known=KnownDids(store.did_fingerprints()))
        # One scan of the per-DID state at start-up (a column or two): the gauge's first value, and a
        # damaged file fails here with StorageError instead of at the first cold DID.
        metrics.DESYNCHRONIZED_DIDS.set(store.count_desynchronized())
        stored = store.load_cursor(self.source)
        self.last_seq: int | None = config.cursor if config.cursor is not None else stored
        # The cursor is exclusive, but the reference PDS can send the event AT the cursor again
        # right after a resume at its head (its outbox starts with lastSeen = -1): drop it.
        self.tracker.stream_seq = self.last_seq
        self.last_time: str | None = None
        self.stop_event = asyncio.Event()
        self._batch = self._new_batch()
        self._batch_started = time.monotonic()
        self.writer = BatchWriter(store, seal=self._seal, stop=self.stop_event, publish=publish,
                                  committed_seq=stored)
        self._span: CoverageSpan | None = None
        self._restart_from_head = False
        self._reconnect = False
        self.captures = Captures()  # commits racing an in-daemon backfill (consumer/resync.py)
        self._counters = EventCounters()
        self.counts = self._counters.counts  # by verdict, "error:<kind>", "unverifiable"

    # -- what an in-daemon resync (consumer/resync.py) uses ------------------------------

    @property
    def committed_seq(self) -> int | None:
        """The cursor of the last batch stored."""
        return self.writer.committed_seq

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Store (and publish) every event applied so far, then keep batch writes out until the
        block ends: a transaction run in the block sees them all and is not interleaved."""
        async with self.writer.exclusive():
            yield

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
                                              "cached_repos": len(self.tracker.rows)}})
        metrics.STORE_HEALTHY.set(1)
        if self.committed_seq is not None:
            metrics.STORAGE_COMMITTED_SEQ.set(self.committed_seq)
        ended = CoverageEnd.ERROR
        drained = False
        ticker = asyncio.create_task(self._tick())
        consume = asyncio.create_task(self._consume())
        stopper = asyncio.create_task(self.stop_event.wait())
        dead = asyncio.create_task(self.writer.dead.wait())
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
            if self.writer.failed is not None:
                raise self.writer.failed
            drained = True  # from here a failure is the drain's own: do not drain again
            await self.writer.flush(wait=True)
            ended = CoverageEnd.CLEAN
        finally:
            await _cancelled(ticker)
            stopper.cancel()
            dead.cancel()
            try:
                if not drained and self.writer.failed is None:
                    await self.writer.flush(wait=True)  # store what was processed before the error (e.g. strict cursor)
            finally:
                await self._end_span(ended)
                if install_signal_handlers:
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        loop.remove_signal_handler(sig)
                log.info("stopped", extra={"ctx": {"cursor": self.committed_seq, "ended": ended.value}})

    async def _end_span(self, ended: CoverageEnd) -> None:
        assert self._span is not None
        try:
            if self.writer.invalidated:
                await asyncio.to_thread(self.store.reconnect)
            await asyncio.to_thread(self.store.end_coverage, self._span.id, ended)
        except StorageError as exc:
            log.error("could not close the coverage span; the next start marks it crashed",
                      extra={"ctx": {"span": self._span.id, "ended": ended.value, "error": str(exc)}})

    async def _consume(self) -> None:
        verifier = self._verifier
        if verifier is not None:
            seeded = await verifier.seed()
            log.info("verifying commits", extra={"ctx": {"keys_from_store": seeded}})
        while not self.stop_event.is_set():
            self._reconnect = False
            if verifier is None:
                await self._read(stream_frames(self.config.relay, lambda: self.last_seq, stop=self.stop_event))
            else:
                await self._read_verified(verified_frames(
                    self.config.relay, verifier, last_seq=lambda: self.last_seq, stop=self.stop_event,
                    want=self.want))
            if self._restart_from_head:
                await self._begin_new_span()

    async def _read(self, frames: AsyncGenerator[bytes, None]) -> None:
        try:
            async for data in frames:
                self._handle(data)
                if not await self._after_frame():
                    break
        finally:
            await frames.aclose()

    async def _read_verified(self, frames: AsyncGenerator[Verified, None]) -> None:
        """--verify: apply or reject each frame by its verdict, in stream order (consumer/verified.py)."""
        try:
            async for event, data, verdict in frames:
                if event is None:
                    self._handle(data)
                elif verdict is None:
                    self._apply(event)
                elif verdict[0] == "unverifiable":
                    self._counters.unverifiable()
                    self._apply(event)
                else:
                    self._reject(event, verdict[0], verdict[1])
                if not await self._after_frame():
                    break
        finally:
            await frames.aclose()

    async def _after_frame(self) -> bool:
        """Seal the batch at either bound; False when an error frame asks for a reconnect.

        The write overlaps the next batch's parsing; the writer first waits for the write in
        flight, so memory stays bounded (one batch filling, one being written) and the reader
        slows to the writer. (A bound on records + events made nearly every 5,000-event batch of
        ~1 record/event take the waiting path: parse and write never overlapped.)"""
        batch = self._batch
        if batch.events >= self.config.batch_events or len(batch.records) >= self.config.batch_events:
            await self.writer.flush(wait=False)
        return not self._reconnect

    async def _tick(self) -> None:
        """Timed flushes and gauges. It never waits for a write in flight (a write retrying through
        an outage must not freeze the gauges) and never dies: a failure is logged and it goes on."""
        next_gauge = time.monotonic() + _GAUGE_EVERY_S  # __init__ just counted
        while True:
            await asyncio.sleep(self.config.flush_interval / 2)
            try:
                if (not self.writer.busy and self._batch.events
                        and time.monotonic() - self._batch_started >= self.config.flush_interval):
                    await self.writer.flush(wait=False)
                self._counters.export(self.last_seq)
                if self.last_time:
                    metrics.FIREHOSE_LAG.set(max(0.0, time.time() - _epoch(self.last_time)))
                if time.monotonic() >= next_gauge and not self.writer.invalidated:
                    started = time.monotonic()
                    metrics.DESYNCHRONIZED_DIDS.set(await asyncio.to_thread(self.store.count_desynchronized))
                    next_gauge = time.monotonic() + _gauge_pause(time.monotonic() - started)
            except asyncio.CancelledError:
                raise
            except StorageError:
                pass  # a failed write is logged where it happens (the writer) and stops the daemon (run)
            except Exception as exc:  # a bug here must not stop timed flushes silently
                log.error("periodic flush failed", extra={"ctx": {"error": repr(exc)}})

    # -- events ---------------------------------------------------------------------------

    def _handle(self, data: bytes) -> None:
        """Parse and apply one frame (with --verify: every frame but #commit and #sync)."""
        try:
            event = parse_frame(data, want=self.want)
        except FrameError as exc:
            self._counters.error(exc.kind)
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

    def _reject(self, event: Commit | Sync, kind: str, reason: str) -> None:
        """Skip an event as bad input; the cursor still moves past it (the DID's chain then
        breaks on its next commit, so it is desynchronized and backfilled)."""
        self._counters.error(kind)
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
            self._counters.error("seq_range")
            log.warning("bad frame skipped", extra={"ctx": {"kind": "seq_range", "seq": event.seq,
                                                            "error": "seq does not fit a signed 64-bit integer"}})
            return
        batch = self._batch
        verdict = self.tracker.apply(event, batch)
        self._counters.applied(event, verdict.value)
        if verdict is Verdict.DESYNCHRONIZED:
            row = self.tracker.row(event.did)
            metrics.DESYNCHRONIZED.labels(row.desync_reason if row else "unknown").inc()
        if verdict in (Verdict.APPLIED, Verdict.DESYNCHRONIZED):
            if self.captures.active:
                self.captures.note(event, chain_broke=verdict is Verdict.DESYNCHRONIZED)
            if batch.changes is not None:
                batch.changes.extend(changes_for(event, self.tracker.row(event.did), self.want))
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
        await self.writer.flush(wait=True)
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

    def _seal(self) -> Batch | None:
        """The writer's `seal`: hand over the filling batch, unless it is empty."""
        batch = self._batch
        if batch.is_empty():
            return None
        # The tracker keeps mutating its live rows; the batch must carry the state as of its cursor.
        batch.repos = {did: copy.copy(row) for did, row in batch.repos.items()}
        self._batch = self._new_batch()
        # every batch before this one is stored (the writer waited for it): evict beyond capacity
        self.tracker.sealed()
        self.tracker.trim(self.writer.committed_batches)
        self._batch_started = time.monotonic()
        self._counters.export(self.last_seq)
        return batch


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def _epoch(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return datetime.now(UTC).timestamp()
