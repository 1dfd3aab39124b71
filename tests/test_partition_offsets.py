"""publish/offsets.py: a partition commits only up to its lowest unfinished request (the Kafka
worker finishes requests out of order: host-fair scheduling, parked hosts)."""

from __future__ import annotations

from aiokafka import TopicPartition

from skyfill.publish.offsets import PartitionOffsets

A, B = TopicPartition("t", 0), TopicPartition("t", 1)


def test_the_commit_point_never_passes_an_unfinished_request() -> None:
    o = PartitionOffsets()
    for off in range(3, 8):
        o.polled(A, off)
    o.polled(B, 0)
    assert o.due() == {A: 3, B: 0}  # nothing finished: the points where reading started
    o.committed(o.due())
    assert o.due() == {}
    for off in (4, 6, 7):
        o.finished(A, off)
    assert o.point(A) == 3 and o.due() == {}   # 3 is open (its host is parked, say)
    o.finished(A, 3)
    assert o.due() == {A: 5}
    o.finished(A, 5)
    o.finished(B, 0)
    assert o.due() == {A: 8, B: 1} and o.due(only={B}) == {B: 1}
    o.committed({A: 8})
    assert o.due() == {B: 1} and o.open_count() == 0


def test_rewind_and_forget() -> None:
    o = PartitionOffsets()
    for off in range(10):
        o.polled(A, off)
    for off in (0, 1, 2, 5):
        o.finished(A, off)
    assert o.rewind() == {A: 3}             # a stopped run: read again from 3
    assert o.point(A) == 3 and o.open_count() == 0
    o.polled(A, 3)
    assert o.point(A) == 3
    o.forget({A})                           # revoked: the next owner starts from the commit
    o.finished(A, 3)                        # a request of it finishing here afterwards: ignored
    assert o.point(A) is None and o.due() == {}
