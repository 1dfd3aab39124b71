"""The consumer-group loop shared by the sink and the backfill worker: poll, handle, commit.

Delivery is at-least-once: a batch's offsets are committed only after its handler returned,
so a member that dies (or loses its partitions) in between leaves the batch to be replayed by
whichever member owns the partitions next. Handlers must therefore be idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from skyfill.errors import PublishError

__all__ = ["ConsumeLoop", "Polled"]

log = logging.getLogger(__name__)

Polled = dict[TopicPartition, list[ConsumerRecord[Any, Any]]]


class ConsumeLoop:
    """One member of a consumer group (auto-commit off, new groups start at the earliest
    offset). `step` polls up to `max_records` messages, awaits `handle(polled)`, then commits.

    `who` names the member in errors ("sink", "backfill worker"). With `redo_on_refused_commit`,
    a commit refused because the partitions moved to another member during the work is logged
    and ignored (that member replays the batch); otherwise it raises.
    """

    def __init__(
        self,
        topics: Sequence[str],
        handle: Callable[[Polled], Awaitable[None]],
        *,
        who: str,
        bootstrap: str,
        group_id: str,
        max_records: int,
        redo_on_refused_commit: bool = False,
        **consumer_options: Any,
    ) -> None:
        self._topics = tuple(topics)
        self._handle = handle
        self._who = who
        self._bootstrap = bootstrap
        self._group_id = group_id
        self._max_records = max_records
        self._redo_on_refused_commit = redo_on_refused_commit
        self._options = consumer_options
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            *self._topics, bootstrap_servers=self._bootstrap, group_id=self._group_id,
            enable_auto_commit=False, auto_offset_reset="earliest", **self._options,
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise PublishError(f"{self._who} cannot join group {self._group_id} on {self._bootstrap}: {exc!r}") from exc
        self._consumer = consumer

    async def stop(self) -> None:
        """Leave the group WITHOUT committing anything in progress (that is the point)."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def step(self, *, timeout_ms: int = 1000) -> int:
        """Poll once, hand what came to the handler, then commit past it; returns how many."""
        consumer = self._consumer
        if consumer is None:
            raise PublishError(f"{self._who} not started")
        polled = await consumer.getmany(timeout_ms=timeout_ms, max_records=self._max_records)
        if not polled:
            return 0
        await self._handle(polled)
        # Only now: a crash before this line replays these messages, which is harmless.
        offsets = {tp: msgs[-1].offset + 1 for tp, msgs in polled.items()}
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            if not self._redo_on_refused_commit:
                raise
            # The partitions moved to another member during the work; it replays them. Harmless.
            log.warning("offset commit refused after a rebalance; the batch will be redone",
                        extra={"ctx": {"group": self._group_id, "error": repr(exc)}})
        return sum(len(msgs) for msgs in polled.values())

    async def run(self, *, stop: asyncio.Event | None = None, exit_when_idle: bool = False) -> None:
        """`step` until `stop` is set (or, with `exit_when_idle`, until a poll brings nothing)."""
        while stop is None or not stop.is_set():
            if await self.step() == 0 and exit_when_idle:
                break
