"""The daemon's batch writer: sealed batches -> (Kafka, then) DuckDB, one at a time, through outages.

Batches are sealed in the event loop and written by a worker thread while the next batch fills;
at most one write is in flight. When Kafka publishing is on, a batch is written only after the
broker acknowledged all its changes, so neither the cursor nor the mirror ever runs ahead of
the topics.

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
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from skyfill import metrics
from skyfill.backoff import backoff_delay
from skyfill.errors import StorageError
from skyfill.storage import Batch, Publish, Store, failure_kind

__all__ = ["BatchWriter"]

log = logging.getLogger(__name__)

_RETRY_FIRST = 0.5      # seconds before the first retry of a failed batch write ...
_RETRY_MAX = 30.0       # ... doubling up to this (no jitter: one writer, one database)
_REMIND_EVERY = 60.0    # while writes keep failing, log a reminder this often


class BatchWriter:
    """Writes the batches `seal` hands over, in order, at most one in flight (see the module docstring).

    `seal()` returns the filling batch, sealed (a new one takes its place), or None when it holds
    nothing. `stop` is the daemon's stop request: it cuts a retry wait short for one last attempt.
    """

    def __init__(
        self, store: Store, *, seal: Callable[[], Batch | None], stop: asyncio.Event,
        publish: Publish | None = None, committed_seq: int | None = None,
    ) -> None:
        self.store = store
        self.publish = publish
        self.committed_seq = committed_seq   # the cursor of the last batch stored
        self.committed_batches = 0           # batches stored by this writer (they are written in order)
        self.lock = asyncio.Lock()           # held while sealing a batch and starting its write
        # A batch write that failed for good (an invalidated database, a stop during an outage, a
        # publish refused): its events are lost from memory, so nothing may be written after it,
        # or the cursor would pass them. The daemon stops and the next run reads them again.
        self.failed: BaseException | None = None
        self.invalidated = False             # the database cannot be written in this process
        self.dead = asyncio.Event()          # set when `failed` is
        self._seal = seal
        self._stop = stop
        self._inflight: asyncio.Future[None] | None = None

    @property
    def busy(self) -> bool:
        """A flush is starting or a write is in flight."""
        return self.lock.locked() or (self._inflight is not None and not self._inflight.done())

    async def flush(self, *, wait: bool = True) -> None:
        """Seal the current batch and write it; with wait=False return once the write has started.

        It first waits for the write in flight, so memory stays bounded (one batch filling, one
        being written) and a caller that flushes as it reads slows to the writer."""
        async with self.lock:
            await self._settle_write()
            if self.failed is not None:
                raise self.failed
            batch = self._seal()
            if batch is None:
                return
            self._inflight = asyncio.ensure_future(self._write(batch))
            # Its failure also lives in self.failed, which the daemon raises: nobody may need to await it.
            self._inflight.add_done_callback(_observed)
        if wait:
            async with self.lock:
                await self._settle_write()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Store everything sealable now, then keep every batch write out until the block ends:
        no write interleaves with what the block does, and no batch sealed before the block is
        written after it."""
        await self.flush(wait=True)
        async with self.lock:
            await self._settle_write()
            yield

    async def _settle_write(self) -> None:
        """Wait for the write in flight; the caller holds `lock`.

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

    async def _write(self, batch: Batch) -> None:
        try:
            if self.publish is not None and batch.changes:
                await self.publish(batch.changes)
            started = time.perf_counter()
            await self._store(batch)
        except BaseException as exc:
            self.failed = exc
            self.dead.set()
            raise
        self.committed_batches += 1
        metrics.BATCH_WRITE_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_EVENTS.inc(batch.events)
        if batch.cursor is not None:
            self.committed_seq = batch.cursor[1]
            metrics.STORAGE_COMMITTED_SEQ.set(self.committed_seq)

    async def _store(self, batch: Batch) -> None:
        """Write one batch, retrying the same batch through a storage outage (see the module docstring)."""
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
                    self.invalidated = True
                    log.error("storage failed; stopping (restart to resume from the stored cursor)",
                              extra={"ctx": ctx})
                    raise StorageError(
                        f"the database was invalidated by a fatal storage error and cannot be written again "
                        f"in this process; restart to resume from cursor {self.committed_seq} ({cause})") from exc
                delay = backoff_delay(attempts - 1, base=_RETRY_FIRST, cap=_RETRY_MAX, jitter=0.0)
                now = time.monotonic()
                if attempts == 1:
                    failing_since = reminded = now
                    log.error("storage write failed; retrying the batch with backoff, not reading the stream",
                              extra={"ctx": {**ctx, "retry_in": delay}})
                elif now - reminded >= _REMIND_EVERY:
                    reminded = now
                    log.error("storage still failing", extra={"ctx": {**ctx, "failing_for": round(now - failing_since)}})
                if self._stop.is_set():
                    raise StorageError(f"stopped while storage was failing ({kind}: {cause}); the events after "
                                       f"cursor {self.committed_seq} were not stored and are read again on restart"
                                       ) from exc
                try:  # a stop request cuts the wait short for one last attempt
                    await asyncio.wait_for(self._stop.wait(), delay)
                except TimeoutError:
                    pass
                continue
            if attempts:
                log.warning("storage recovered", extra={"ctx": {
                    "attempts": attempts + 1, "cursor": batch.cursor[1] if batch.cursor else self.committed_seq,
                    "failing_for": round(time.monotonic() - failing_since)}})
            metrics.STORE_HEALTHY.set(1)
            return


def _observed(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: no "Task exception was never retrieved" at exit


def _seq_range(batch: Batch) -> tuple[int | None, int | None]:
    span = batch.coverage
    return (span.first_seq, span.last_seq) if span is not None else (None, None)
