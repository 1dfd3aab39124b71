"""Which offset a partition may commit when its requests finish out of order.

A worker schedules a partition's requests by host, so they finish in any order: request 7 may be
done while request 3 waits for its parked host. The committed offset is the lowest offset polled
and not finished (else one past the last polled): the cursor never passes unfinished work, so a
worker that dies replays exactly what was not finished (and perhaps some that was: at-least-once).

    polled 3 4 5 6 7, finished 4 6 7  -> commit 3 (3 and 5 are open)
    finished 3                         -> commit 5
    finished 5                         -> commit 8
"""

from __future__ import annotations

from aiokafka import TopicPartition

__all__ = ["PartitionOffsets"]


class PartitionOffsets:
    """Open (polled, unfinished) offsets per partition and the commit point they allow."""

    def __init__(self) -> None:
        self._open: dict[TopicPartition, dict[int, None]] = {}   # insertion = offset order
        self._next: dict[TopicPartition, int] = {}               # one past the last polled
        self._committed: dict[TopicPartition, int] = {}

    def polled(self, tp: TopicPartition, offset: int) -> None:
        self._open.setdefault(tp, {})[offset] = None
        self._next[tp] = offset + 1

    def finished(self, tp: TopicPartition, offset: int) -> None:
        """The request at `offset` is done (backfilled, terminal, re-queued or invalid). A
        partition no longer tracked (revoked) is ignored."""
        open_ = self._open.get(tp)
        if open_ is not None:
            open_.pop(offset, None)

    def point(self, tp: TopicPartition) -> int | None:
        """The offset `tp` may commit: its lowest open offset, else one past the last polled."""
        open_ = self._open.get(tp)
        if open_:
            return next(iter(open_))
        return self._next.get(tp)

    def due(self, only: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Commit points that moved since the last `committed` (of the partitions in `only`)."""
        out = {}
        for tp in self._next:
            if only is not None and tp not in only:
                continue
            point = self.point(tp)
            if point is not None and point > self._committed.get(tp, -1):
                out[tp] = point
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, tps: set[TopicPartition]) -> None:
        """These partitions left this member: the next owner starts from their last commit."""
        for tp in tps:
            self._open.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)

    def rewind(self) -> dict[TopicPartition, int]:
        """Partitions with requests left unfinished (a run that stopped) -> the offset to read
        them again from (their commit point); their tracking restarts there."""
        out = {tp: next(iter(o)) for tp, o in self._open.items() if o}
        for tp, point in out.items():
            self._open[tp] = {}
            self._next[tp] = point
        return out

    def open_count(self) -> int:
        return sum(len(o) for o in self._open.values())
