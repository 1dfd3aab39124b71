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

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from skyfill.errors import PublishError

__all__ = ["ConsumeLoop", "Polled"]

log = logging.getLogger(__name__)

Polled = dict[TopicPartition, list[ConsumerRecord[Any, Any]]]


class ConsumeLoop:
    """One member of a consumer group (auto-commit off, new groups start at the earliest
    offset). `step` polls up to `max_records` messages, awaits `handle(polled)`, then commits;
    a member that schedules its own work (the backfill worker) uses `poll` and `commit` instead.

    `who` names the member in errors ("sink", "backfill worker"). With `redo_on_refused_commit`,
    a commit refused because the partitions moved to another member during the work is logged
    and ignored (that member replays the batch); otherwise it raises.
    """

    def __init__(
        self,
        topics: Sequence[str],
        handle: Callable[[Polled], Awaitable[None]] | None,
        *,
        who: str,
        bootstrap: str,
        group_id: str,
        max_records: int,
        redo_on_refused_commit: bool = False,
        on_revoked: Callable[[set[TopicPartition]], Awaitable[None]] | None = None,
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
        self._on_revoked = on_revoked
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap, group_id=self._group_id,
            enable_auto_commit=False, auto_offset_reset="earliest", **self._options,
        )
        consumer.subscribe(self._topics, listener=_Revoked(self._on_revoked))
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

    def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise PublishError(f"{self._who} not started")
        return self._consumer

    async def poll(self, *, timeout_ms: int, max_records: int, paused: bool = False) -> Polled:
        """One poll of up to `max_records`. `paused`: the assigned partitions are paused, so
        nothing is read but the member stays in its group (a poll is due every
        max_poll_interval_ms); the next unpaused poll resumes them where they were."""
        consumer = self._started()
        assigned = consumer.assignment()
        if paused:
            consumer.pause(*assigned)
        else:
            consumer.resume(*consumer.paused())
        return await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read `tp` again from `offset` at the next poll (a partition no longer assigned is left
        to its new owner, who reads it from the last commit)."""
        try:
            self._started().seek(tp, offset)
        except IllegalStateError:
            pass

    def assigned(self) -> bool:
        """Whether the group gave this member any partition (yet)."""
        return bool(self._started().assignment())

    async def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit `offsets` (the next offset to read, per partition); False when a rebalance
        refused it (with `redo_on_refused_commit`; the new owner replays from the last commit)."""
        consumer = self._started()
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            if not self._redo_on_refused_commit:
                raise
            # The partitions moved to another member during the work; it replays them. Harmless.
            log.warning("offset commit refused after a rebalance; the batch will be redone",
                        extra={"ctx": {"group": self._group_id, "error": repr(exc)}})
            return False
        return True

    async def step(self, *, timeout_ms: int = 1000) -> int:
        """Poll once, hand what came to the handler, then commit past it; returns how many."""
        polled = await self.poll(timeout_ms=timeout_ms, max_records=self._max_records)
        if not polled:
            return 0
        if self._handle is None:
            raise PublishError(f"{self._who} polls by itself: no step()")
        await self._handle(polled)
        # Only now: a crash before this line replays these messages, which is harmless.
        await self.commit({tp: msgs[-1].offset + 1 for tp, msgs in polled.items()})
        return sum(len(msgs) for msgs in polled.values())

    async def run(self, *, stop: asyncio.Event | None = None, exit_when_idle: bool = False) -> None:
        """`step` until `stop` is set (or, with `exit_when_idle`, until a poll brings nothing)."""
        while stop is None or not stop.is_set():
            if await self.step() == 0 and exit_when_idle:
                break


class _Revoked(ConsumerRebalanceListener):  # type: ignore[misc]
    """Calls `on_revoked(partitions)` before partitions leave this member (to commit what is done)."""

    def __init__(self, on_revoked: Callable[[set[TopicPartition]], Awaitable[None]] | None) -> None:
        self._on_revoked = on_revoked

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if self._on_revoked is not None and revoked:
            await self._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None
