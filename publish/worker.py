"""`skyfill backfill-worker`: backfill the DIDs requested on `skyfill.backfill`, N workers per group.

Each message is one request, keyed by its DID (so requests for one DID stay on one partition
and two workers never reconcile the same DID at once, except briefly during a rebalance).
A worker commits an offset only after `backfill_one(did)` returned for that message and for
every earlier message of the partition. A worker killed mid-way, or a rebalance, therefore
replays its uncommitted requests on another member: at-least-once. A replay is harmless
because a reconciliation is one DuckDB transaction that makes the stored repo equal to the
fetched one (idempotent); a repo is never left half-written.

`backfill_one` owns the outcome of a backfill, including recording a failure on the repo row.
If it raises anyway, the request is re-queued at the tail of the topic (attempt counted in a
header) and committed; after `max_attempts` it goes to `<topic>.dead` with the error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError

from skyfill import metrics
from skyfill.errors import BackfillRetry, ConfigError, InputError, PublishError

from .consume_loop import ConsumeLoop, Polled
from .messages import BACKFILL_TOPIC
from .requests import decode_request, encode_request

__all__ = ["BackfillWorker", "BackfillOne", "BackfillRetry", "backfill_one_from"]  # BackfillRetry: re-exported from skyfill.errors

log = logging.getLogger(__name__)

BackfillOne = Callable[[str], Awaitable[None]]

_ATTEMPT_HEADER = "skyfill-attempt"


def _attempt(msg: ConsumerRecord[Any, Any]) -> int:
    for name, value in msg.headers or ():
        if name == _ATTEMPT_HEADER:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


class BackfillWorker:
    """One member of the backfill consumer group; `run()` until `stop` is set."""

    def __init__(
        self,
        bootstrap: str,
        backfill_one: BackfillOne,
        *,
        topic: str = BACKFILL_TOPIC,
        group_id: str = "skyfill-backfill",
        concurrency: int = 8,
        max_attempts: int = 5,
        max_poll_interval_ms: int = 900_000,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        client_id: str = "skyfill-backfill-worker",
    ) -> None:
        if concurrency < 1 or max_attempts < 1:
            raise ConfigError("concurrency and max_attempts must be >= 1")
        self.bootstrap = bootstrap
        self.topic = topic
        self.group_id = group_id
        self._backfill_one = backfill_one
        self._max_attempts = max_attempts
        self._loop = ConsumeLoop(
            (topic,), self._handle_batch,
            who="backfill worker", bootstrap=bootstrap, group_id=group_id, max_records=concurrency,
            redo_on_refused_commit=True, client_id=client_id, max_poll_interval_ms=max_poll_interval_ms,
            session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=heartbeat_interval_ms,
        )
        self._producer: AIOKafkaProducer | None = None
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

    async def run(self, *, stop: asyncio.Event | None = None, exit_when_idle: bool = False) -> int:
        await self._loop.run(stop=stop, exit_when_idle=exit_when_idle)
        return self.processed

    async def step(self, *, timeout_ms: int = 1000) -> int:
        """Take up to `concurrency` requests, backfill them, then commit their offsets."""
        return await self._loop.step(timeout_ms=timeout_ms)

    async def _handle_batch(self, polled: Polled) -> None:
        async with asyncio.TaskGroup() as tg:
            for msgs in polled.values():
                for msg in msgs:
                    tg.create_task(self._handle(msg))

    async def _handle(self, msg: ConsumerRecord[Any, Any]) -> None:
        try:
            did, reasons = decode_request(msg.value)
        except InputError as exc:
            metrics.KAFKA_WORKER_REQUESTS.labels("invalid").inc()
            log.warning("skipping a backfill request that is not a DID",
                        extra={"ctx": {"offset": msg.offset, "error": str(exc)}})
            return
        try:
            await self._backfill_one(did)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - anything escaping backfill_one is re-queued, never lost
            await self._requeue(msg, did, reasons, exc)
            return
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
    """Adapt `backfill.Backfiller` to a BackfillOne: a transient outcome raises, so it is re-queued.

    The backfiller records every outcome on the worker's repo row; terminal ones (RepoNotFound,
    takedown, bad signature, ...) are final and the request is done.
    """

    async def one(did: str) -> None:
        summary = await backfiller.run([did])
        transient = sorted(set(summary.failed) & _RETRY_OUTCOMES)
        if transient:
            raise BackfillRetry(f"backfill of {did} ended {transient[0]}")

    return one

