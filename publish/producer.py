"""Publish change batches to Kafka and return only when the broker acknowledged all of them.

Ordering rule: for one topic-partition, at most one batch is outstanding, and a batch that
failed is re-sent before anything after it. A DID maps to one partition (murmur2 of the key,
the Java client's partitioner), so its messages are written in event order. Worked example,
DID A with events a1 a2 a3 split over two producer batches [a1 a2] [a3]:
    [a1 a2] times out (broker frozen)     -> re-sent; [a3] has not been sent yet
    log: a1 a2 a1 a2 a3                   (the broker kept the first copy: at-least-once)
Never `a3 a1 a2`. Without an idempotent producer a timed-out batch may be written twice, as
a contiguous repeat; consumers are idempotent by (did, collection, rkey, rev).

Outage rule: `publish()` never gives up on a reachable-later broker. It retries with jittered
backoff, holding only the batch it was given (memory stays bounded, the caller is paused), logs
"broker unreachable, pausing" once per outage and flips `skyfill_kafka_connected` to 0.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    UnknownError,
    UnsupportedVersionError,
)
from aiokafka.partitioner import murmur2

from skyfill import metrics
from skyfill.backoff import backoff_delay
from skyfill.errors import ConfigError, PublishError
from skyfill.storage import Change

from .messages import RECORDS_TOPIC, REPOS_TOPIC, Message, Topics, encode_change
from .topics import ensure_topics

__all__ = ["KafkaPublisher"]

log = logging.getLogger(__name__)


def _retriable(exc: BaseException) -> bool:
    # KafkaTimeoutError (buffer/metadata wait) is not flagged retriable by aiokafka, but for
    # us it is exactly the "broker not answering" case.
    return isinstance(exc, (KafkaTimeoutError, KafkaConnectionError, asyncio.TimeoutError)) or bool(
        getattr(exc, "retriable", False)
    )


class KafkaPublisher:
    """Sends `Change`s keyed by DID; `publish` returns when every message is acknowledged (acks=all)."""

    def __init__(
        self,
        bootstrap: str,
        *,
        records_topic: str = RECORDS_TOPIC,
        repos_topic: str = REPOS_TOPIC,
        idempotence: bool | None = None,
        create_partitions: int | None = None,
        request_timeout_ms: int = 30_000,
        max_batch_bytes: int = 512 * 1024,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        compression_type: str | None = None,
        client_id: str = "skyfill",
    ) -> None:
        if not bootstrap:
            raise ConfigError("a Kafka bootstrap address is required")
        if request_timeout_ms <= 0 or max_batch_bytes <= 0 or backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ConfigError("request_timeout_ms, max_batch_bytes and the backoffs must be positive")
        self.bootstrap = bootstrap
        self.topics = Topics(records=records_topic, repos=repos_topic)
        self._idempotence = idempotence        # None: on if the broker supports it
        self._create_partitions = create_partitions
        self._request_timeout_ms = request_timeout_ms
        self._max_batch_bytes = max_batch_bytes
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._compression = compression_type
        self._client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._connected = True
        self._held = 0
        self.idempotent = False                # what start() negotiated

    # -- lifecycle --------------------------------------------------------------------------

    def _new_producer(self, idempotent: bool) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=idempotent,
            request_timeout_ms=self._request_timeout_ms,
            max_batch_size=self._max_batch_bytes,
            max_request_size=max(self._max_batch_bytes, 1_048_576),
            compression_type=self._compression,
        )

    async def start(self) -> None:
        """Connect (waiting out an unreachable broker) and negotiate idempotence."""
        if self._producer is not None:
            raise PublishError("publisher already started")
        metrics.KAFKA_PUBLISHING.set(1)
        want = self._idempotence is not False
        attempt = 0
        while True:
            producer = self._new_producer(want)
            try:
                await producer.start()
                if self._create_partitions:
                    await ensure_topics(
                        self.bootstrap, {t: self._create_partitions for t in (self.topics.records, self.topics.repos)},
                        request_timeout_ms=self._request_timeout_ms,
                    )
            except (UnknownError, UnsupportedVersionError) as exc:
                await producer.stop()
                if not want or self._idempotence is True:
                    raise PublishError(f"broker refused the idempotent producer: {exc!r}") from exc
                # Tansu 0.6 (in-memory engine) answers InitProducerId v0 with UNKNOWN_SERVER_ERROR.
                log.warning(
                    "broker does not support the idempotent producer; using acks=all with one batch in "
                    "flight per partition (order kept, duplicates possible on retry)",
                    extra={"ctx": {"bootstrap": self.bootstrap, "error": repr(exc)}},
                )
                want = False
                continue
            except KafkaError as exc:
                await producer.stop()
                if not _retriable(exc):
                    raise PublishError(f"cannot start the Kafka producer: {exc!r}") from exc
                attempt = await self._pause(exc, attempt)
                continue
            self._producer = producer
            self.idempotent = want
            self._reachable()
            return

    async def aclose(self) -> None:
        producer, self._producer = self._producer, None
        metrics.KAFKA_PUBLISHING.set(0)
        if producer is not None:
            await producer.stop()

    async def __aenter__(self) -> KafkaPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- publishing -------------------------------------------------------------------------

    @property
    def held_messages(self) -> int:
        """Messages this publisher holds right now (0 between calls; at most one batch's worth)."""
        return self._held

    async def publish(self, changes: Sequence[Change]) -> None:
        """Send `changes` in order, keyed by DID; return when the broker acknowledged every one."""
        if not changes:
            return
        async with self._lock:  # one batch at a time: memory is bounded by the caller's batch
            producer = self._producer
            if producer is None:
                raise PublishError("publisher not started")
            messages = [encode_change(c, self.topics) for c in changes]
            self._held = len(messages)
            try:
                runs = await self._split(producer, messages)
                async with asyncio.TaskGroup() as tg:
                    for (topic, partition), run in runs.items():
                        tg.create_task(self._send_run(producer, topic, partition, run))
            except* PublishError as group:
                raise group.exceptions[0] from None
            finally:
                self._held = 0

    async def _split(
        self, producer: AIOKafkaProducer, messages: list[Message]
    ) -> dict[tuple[str, int], list[Message]]:
        """Group messages by topic-partition, keeping their order inside each group."""
        partitions: dict[str, list[int]] = {}
        for topic in {m.topic for m in messages}:
            found = await self._retry(lambda t=topic: producer.partitions_for(t))  # type: ignore[misc]
            partitions[topic] = sorted(found)
        hashes: dict[bytes, int] = {}
        runs: dict[tuple[str, int], list[Message]] = {}
        for m in messages:
            h = hashes.get(m.key)
            if h is None:
                h = hashes[m.key] = murmur2(m.key) & 0x7FFFFFFF
            parts = partitions[m.topic]
            runs.setdefault((m.topic, parts[h % len(parts)]), []).append(m)
        return runs

    async def _send_run(self, producer: AIOKafkaProducer, topic: str, partition: int, run: list[Message]) -> None:
        i = 0
        while i < len(run):
            attempt = 0
            while True:
                builder = producer.create_batch()
                j = i
                while j < len(run) and builder.append(key=run[j].key, value=run[j].value, timestamp=None) is not None:
                    j += 1
                if j == i:
                    raise PublishError(
                        f"message of {len(run[i].value)} bytes for {run[i].key.decode()} exceeds the batch limit"
                    )
                try:
                    fut = await producer.send_batch(builder, topic, partition=partition)
                    await self._await_ack(fut)
                except KafkaError as exc:
                    if not _retriable(exc):
                        raise PublishError(f"broker refused a batch for {topic}[{partition}]: {exc!r}") from exc
                    attempt = await self._pause(exc, attempt)
                    continue
                self._reachable()
                metrics.KAFKA_PUBLISHED.labels(topic).inc(j - i)
                break
            i = j

    async def _await_ack(self, fut: asyncio.Future[Any]) -> None:
        # An idempotent producer never expires a batch: aiokafka retries it until the broker
        # answers. Report the outage meanwhile, but keep waiting on the same future (re-sending
        # would reorder). A non-idempotent batch fails by itself after request_timeout_ms.
        timeout = self._request_timeout_ms / 1000
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout)
                return
            except TimeoutError:
                self._outage(KafkaTimeoutError("no acknowledgement within request_timeout_ms"))

    async def _pause(self, exc: BaseException, attempt: int) -> int:
        """Report the outage and wait out the backoff of the next attempt; returns its number."""
        self._outage(exc)
        attempt += 1
        await asyncio.sleep(self._backoff(attempt))
        return attempt

    async def _retry(self, call: Any) -> Any:
        attempt = 0
        while True:
            try:
                result = await call()
            except KafkaError as exc:
                if not _retriable(exc):
                    raise PublishError(f"Kafka metadata request failed: {exc!r}") from exc
                attempt = await self._pause(exc, attempt)
                continue
            if not result:  # topic unknown yet (being created): same as not reachable
                attempt = await self._pause(KafkaTimeoutError("no partitions known for topic"), attempt)
                continue
            return result

    # -- health -----------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        return backoff_delay(min(attempt, 20), base=self._backoff_initial, cap=self._backoff_max)

    def _outage(self, exc: BaseException) -> None:
        metrics.KAFKA_PUBLISH_RETRIES.inc()
        if self._connected:
            self._connected = False
            metrics.KAFKA_CONNECTED.set(0)
            log.warning("broker unreachable, pausing", extra={"ctx": {"bootstrap": self.bootstrap, "error": repr(exc)}})

    def _reachable(self) -> None:
        metrics.KAFKA_CONNECTED.set(1)
        if not self._connected:
            self._connected = True
            log.info("broker reachable again, resuming", extra={"ctx": {"bootstrap": self.bootstrap}})
