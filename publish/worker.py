"""`skyfill backfill-worker`: backfill the DIDs requested on `skyfill.backfill`, N workers per group.

Each message is one request, keyed by its DID (so requests for one DID stay on one partition
and two workers never reconcile the same DID at once, except briefly during a rebalance).

Scheduling is host-fair, as in `skyfill backfill --from-queue` (skyfill.net.scheduler): the
polled requests of every partition this member owns go into per-host queues, handed out
round-robin to `concurrency` tasks, at most `per_host` per host; a host parked by a 429 +
Retry-After keeps its requests waiting (no attempt counted) while the other hosts' requests go
on, and the member keeps polling while fewer than `room` requests wait (then it pauses its
partitions, still polling to stay in the group: a park longer than the room absorbs stalls the
worker until it ends, at most the limiter's max_park).

Offsets: requests finish out of order, so each partition commits only up to its lowest
unfinished request (publish/offsets.py): the cursor never passes unfinished work, a parked
host's request included. A worker killed mid-way, or a rebalance, therefore replays its
uncommitted requests on another member: at-least-once. A replay is harmless because a
reconciliation is one DuckDB transaction that makes the stored repo equal to the fetched one
(idempotent); a repo is never left half-written.

`backfill_one` owns the outcome of a backfill, including recording a failure on the repo row.
If it raises RateLimited (the DID's host is parked; nothing attempted), the request waits
again for its host. If it raises anything else, the request is re-queued at the tail of the
topic (attempt counted in a header) and counts as finished; after `max_attempts` it goes to
`<topic>.dead` with the error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from skyfill import metrics
from skyfill.errors import BackfillRetry, ConfigError, InputError, PublishError, RateLimited
from skyfill.net.scheduler import HostScheduler

from .consume_loop import ConsumeLoop
from .messages import BACKFILL_TOPIC
from .offsets import PartitionOffsets
from .requests import decode_request, encode_request

__all__ = ["BackfillWorker", "BackfillOne", "BackfillRetry", "HostsOf", "backfill_one_from"]  # BackfillRetry: re-exported from skyfill.errors

log = logging.getLogger(__name__)

BackfillOne = Callable[[str], Awaitable[None]]
HostsOf = Callable[[list[str]], Awaitable[list[str]]]   # DIDs -> the host of each, for scheduling

_ATTEMPT_HEADER = "skyfill-attempt"
_POLL_MS = 500            # poll timeout while work is under way (commits follow each poll)
_EXPORT_EVERY = 1.0       # seconds between per-host gauge updates
_JOIN_GRACE = 30.0        # exit_when_idle: how long to wait for a partition before calling it idle


def _attempt(msg: ConsumerRecord[Any, Any]) -> int:
    for name, value in msg.headers or ():
        if name == _ATTEMPT_HEADER:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


async def _one_host(dids: list[str]) -> list[str]:
    return [""] * len(dids)


@dataclass(slots=True)
class _Request:
    tp: TopicPartition
    msg: ConsumerRecord[Any, Any]
    did: str
    reasons: list[str]


class BackfillWorker:
    """One member of the backfill consumer group; `run()` until `stop` is set.

    `hosts_of` and `parked_hosts` (the backfiller's: `Backfiller.hosts_of`, its client's
    `parked_hosts`) make the scheduling host-fair; without them every request is of one host.
    """

    def __init__(
        self,
        bootstrap: str,
        backfill_one: BackfillOne,
        *,
        topic: str = BACKFILL_TOPIC,
        group_id: str = "skyfill-backfill",
        concurrency: int = 8,
        per_host: int | None = None,
        hosts_of: HostsOf | None = None,
        parked_hosts: Callable[[], Mapping[str, float]] | None = None,
        room: int | None = None,
        max_attempts: int = 5,
        max_poll_interval_ms: int = 900_000,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        client_id: str = "skyfill-backfill-worker",
    ) -> None:
        if concurrency < 1 or max_attempts < 1 or (per_host is not None and per_host < 1):
            raise ConfigError("concurrency, per_host and max_attempts must be >= 1")
        self.bootstrap = bootstrap
        self.topic = topic
        self.group_id = group_id
        self._backfill_one = backfill_one
        self._max_attempts = max_attempts
        self._concurrency = concurrency
        self._per_host = per_host or concurrency
        self._hosts_of = hosts_of or _one_host
        self._parked: Callable[[], Mapping[str, float]] = parked_hosts or dict
        self._room = room or max(64, concurrency * 8)   # requests waiting in memory, at most
        self._loop = ConsumeLoop(
            (topic,), None,
            who="backfill worker", bootstrap=bootstrap, group_id=group_id, max_records=self._room,
            redo_on_refused_commit=True, on_revoked=self._revoked, client_id=client_id,
            max_poll_interval_ms=max_poll_interval_ms, session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
        )
        self._producer: AIOKafkaProducer | None = None
        self._offsets = PartitionOffsets()
        self._halting = False
        self._crash: BaseException | None = None
        self._sched: HostScheduler[_Request] | None = None
        self.processed = 0

    async def start(self) -> None:
        await self._loop.start()
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        try:
            await producer.start()
        except KafkaError as exc:
            await self._loop.stop()
            await producer.stop()
            raise PublishError(f"backfill worker cannot join group {self.group_id} on {self.bootstrap}: {exc!r}") from exc
        self._producer = producer

    async def aclose(self) -> None:
        """Leave the group WITHOUT committing anything in progress (that is the point)."""
        await self._loop.stop()
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def __aenter__(self) -> BackfillWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def run(self, *, stop: asyncio.Event | None = None, exit_when_idle: bool = False,
                  polls: int | None = None) -> int:
        """Poll, schedule and backfill until `stop` is set (or, with `exit_when_idle`, until a poll
        brings nothing and nothing is left; or after `polls` polls, once their requests are done).
        On `stop`, requests under way finish and are committed; those not started are replayed."""
        sched: HostScheduler[_Request] = HostScheduler(per_host=self._per_host, parked=self._parked)
        self._sched = sched
        self._halting = False
        self._crash = None
        workers = [asyncio.create_task(self._work(sched)) for _ in range(self._concurrency)]
        try:
            await self._feed(sched, stop, exit_when_idle, polls)
            self._halting = True
            await sched.wait_settled()   # what is under way finishes; nothing new starts
            if self._crash is not None:
                raise self._crash  # e.g. a re-queue the broker refused: nothing more is committed
            await self._commit()
            for tp, offset in self._offsets.rewind().items():  # polled, not started: read again by a next run
                self._loop.seek(tp, offset)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            self._sched = None
            sched.export_metrics()
        return self.processed

    async def step(self, *, timeout_ms: int = 1000) -> int:
        """One poll; its requests are backfilled (host-fairly), then committed. Returns the requests done."""
        before = self.processed
        await self.run(polls=1)
        return self.processed - before

    # -- the feed: poll -> per-host queues; commit what finished --------------------------------

    async def _feed(self, sched: HostScheduler[_Request], stop: asyncio.Event | None, exit_when_idle: bool,
                    polls: int | None) -> None:
        exported = 0.0
        began = time.monotonic()
        while stop is None or not stop.is_set():
            if self._crash is not None:
                raise self._crash
            full = len(sched) >= self._room or (polls is not None and polls <= 0)
            polled = await self._loop.poll(timeout_ms=_POLL_MS if full or not sched.idle() else 1000,
                                           max_records=max(1, self._room - len(sched)), paused=full)
            if polls is not None and not full:
                polls -= 1
            await self._schedule(sched, polled)
            await self._commit()
            if time.monotonic() - exported >= _EXPORT_EVERY:
                exported = time.monotonic()
                sched.export_metrics()
            if not polled and sched.idle() and (polls is not None and polls <= 0 or exit_when_idle and (
                    self._loop.assigned() or time.monotonic() - began > _JOIN_GRACE)):
                return  # idle: not before the group assigned partitions (or plainly gave none)

    async def _schedule(self, sched: HostScheduler[_Request], polled: dict[TopicPartition, list[Any]]) -> None:
        reqs: list[_Request] = []
        for tp, msgs in polled.items():
            for msg in msgs:
                self._offsets.polled(tp, msg.offset)
                try:
                    did, reasons = decode_request(msg.value)
                except InputError as exc:
                    metrics.KAFKA_WORKER_REQUESTS.labels("invalid").inc()
                    log.warning("skipping a backfill request that is not a DID",
                                extra={"ctx": {"offset": msg.offset, "error": str(exc)}})
                    self._offsets.finished(tp, msg.offset)
                    continue
                reqs.append(_Request(tp, msg, did, reasons))
        if reqs:
            hosts = await self._hosts_of([r.did for r in reqs])
            for req, host in zip(reqs, hosts, strict=True):
                sched.add(host, req)

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        due = self._offsets.due(only)
        if due and await self._loop.commit(due):
            self._offsets.committed(due)

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        """Partitions leave this member: commit what finished, then forget them (the next owner
        replays from there; requests of theirs still under way here finish harmlessly)."""
        await self._commit(revoked)
        self._offsets.forget(revoked)
        if self._sched is not None:  # their waiting requests: the next owner reads them again
            self._sched.discard(lambda req: req.tp in revoked)

    # -- the workers -----------------------------------------------------------------------------

    async def _work(self, sched: HostScheduler[_Request]) -> None:
        try:
            while (item := await sched.take()) is not None:
                host, req = item
                if self._halting:
                    sched.put_back(host, req)
                    return
                await self._handle(sched, host, req)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - surfaced by the feed, which stops the run
            self._crash = exc
            raise

    async def _handle(self, sched: HostScheduler[_Request], host: str, req: _Request) -> None:
        try:
            await self._backfill_one(req.did)
        except asyncio.CancelledError:
            sched.put_back(host, req)
            raise
        except RateLimited as exc:
            # not attempted: the host is parked; the request waits for it, its offset stays open
            if exc.host and exc.host != host:
                sched.release(host, ok=False)
                sched.add(exc.host, req)
            else:
                sched.put_back(host, req)
            return
        except Exception as exc:  # noqa: BLE001 - anything escaping backfill_one is re-queued, never lost
            try:
                await self._requeue(req.msg, req.did, req.reasons, exc)
            finally:
                sched.release(host, ok=False)
            self._offsets.finished(req.tp, req.msg.offset)
            return
        sched.release(host, ok=True)
        self._offsets.finished(req.tp, req.msg.offset)
        self.processed += 1
        metrics.KAFKA_WORKER_REQUESTS.labels("done").inc()

    async def _requeue(self, msg: ConsumerRecord[Any, Any], did: str, reasons: list[str], exc: Exception) -> None:
        producer = self._producer
        assert producer is not None
        attempt = _attempt(msg) + 1
        dead = attempt >= self._max_attempts
        topic = f"{self.topic}.dead" if dead else self.topic
        value = encode_request(did, reasons, error=repr(exc) if dead else None)
        await producer.send_and_wait(topic, value, key=did.encode(), headers=[(_ATTEMPT_HEADER, str(attempt).encode())])
        metrics.KAFKA_WORKER_REQUESTS.labels("dead" if dead else "requeued").inc()
        log.warning("backfill raised; request %s", "dead-lettered" if dead else "re-queued",
                    extra={"ctx": {"did": did, "attempt": attempt, "error": repr(exc)}})


# Outcomes that a later attempt may fix. The worker's local row keeps its own retry time, but
# no worker reads its local queue: the retry must travel on the topic (attempt header, then
# the dead-letter topic), or the request would be lost for the shared sink.
_RETRY_OUTCOMES = frozenset({"retrying", "deferred"})


def backfill_one_from(backfiller: Any) -> BackfillOne:
    """Adapt `backfill.Backfiller` to a BackfillOne: a transient outcome raises, so it is re-queued;
    a parked host raises RateLimited (nothing attempted), so the request waits for the host.

    The backfiller records every outcome on the worker's repo row; terminal ones (RepoNotFound,
    takedown, bad signature, ...) are final and the request is done.
    """

    async def one(did: str) -> None:
        outcome = await backfiller.backfill_requested(did)
        if outcome in _RETRY_OUTCOMES:
            raise BackfillRetry(f"backfill of {did} ended {outcome}")

    return one
