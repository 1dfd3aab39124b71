"""Host-fair scheduling: one FIFO per PDS host, handed out round-robin over hosts that may be asked.

A DID is taken only from a host that is not parked (429 + Retry-After, RateLimit-Remaining: 0)
and has fewer than `per_host` DIDs in flight; the hosts take turns, so a slow or parked host
never holds the workers while others have work. A parked host's DIDs wait here, no attempt
counted, until the park ends; the limiter (net/ratelimit.py) still guards every request, so a
park that starts mid-request is honoured there too. Worked example, per_host=2, 3 workers,
host A parked until t=30 with 100 DIDs, host B with 5: the workers take B1, B2 (B's cap),
then wait; B1 done -> B3 ... B's 5 finish before t=30 and A receives nothing before t=30.

Memory: the caller adds DIDs only while `len(scheduler) < room` (bounded; see `work_queue` in
backfill/queue_run.py and the Kafka worker, publish/worker.py, which both schedule with this).
An item is whatever the caller hands out (a DID, or a Kafka request carrying its DID). Gauges per host (queued, in_flight, parked, done, failed) are exported
for the `TOP_HOSTS` hosts with the most queued DIDs, the rest summed under host="other", so the
label count stays bounded whatever the number of hosts.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from skyfill import metrics

__all__ = ["HostScheduler", "HostCounts", "TOP_HOSTS"]

TOP_HOSTS: Final = 20

T = TypeVar("T")


@dataclass(slots=True)
class HostCounts(Generic[T]):
    queued: deque[T] = field(default_factory=deque)
    in_flight: int = 0
    done: int = 0
    failed: int = 0


class HostScheduler(Generic[T]):
    """Per-host queues of DIDs (or items carrying one), handed out fairly (see the module docstring)."""

    def __init__(self, *, per_host: int, parked: Callable[[], Mapping[str, float]]) -> None:
        if per_host < 1:
            raise ValueError("per_host must be positive")
        self._per_host = per_host
        self._parked = parked
        self._hosts: dict[str, HostCounts[T]] = {}
        self._turns: deque[str] = deque()   # hosts with queued DIDs, in turn order
        self._changed = asyncio.Event()
        self._closed = False
        self._buffered = 0

    def __len__(self) -> int:
        """DIDs waiting here (not in flight)."""
        return self._buffered

    def add(self, host: str, did: T) -> None:
        counts: HostCounts[T] = self._hosts.setdefault(host, HostCounts())
        if not counts.queued:
            self._turns.append(host)
        counts.queued.append(did)
        self._buffered += 1
        self._changed.set()

    def put_back(self, host: str, did: T) -> None:
        """The item taken from `host` was not attempted (the host parked meanwhile): it waits
        again at the head of the host's queue, counted neither done nor failed."""
        counts = self._hosts[host]
        counts.in_flight -= 1
        if not counts.queued:
            self._turns.append(host)
        counts.queued.appendleft(did)
        self._buffered += 1
        self._changed.set()

    async def wait_room(self, room: int) -> None:
        """Return once fewer than `room` DIDs wait here."""
        while self._buffered >= room:
            self._changed.clear()
            await self._changed.wait()

    def close(self) -> None:
        """No more DIDs will be added: `take` returns None once every queue is empty."""
        self._closed = True
        self._changed.set()

    def drain(self, host: str) -> list[T]:
        """Remove and return the DIDs waiting for `host` (to defer them to the durable queue)."""
        counts = self._hosts.get(host)
        if counts is None or not counts.queued:
            return []
        out = list(counts.queued)
        counts.queued.clear()
        self._buffered -= len(out)
        self._turns.remove(host)
        self._changed.set()
        return out

    def discard(self, drop: Callable[[T], bool]) -> int:
        """Remove the waiting items for which `drop(item)` is true (their partition left this
        Kafka worker, say); returns how many. Items in flight are not touched."""
        n = 0
        for host, counts in self._hosts.items():
            if not counts.queued:
                continue
            kept = deque(item for item in counts.queued if not drop(item))
            n += len(counts.queued) - len(kept)
            counts.queued = kept
            if not kept:
                self._turns.remove(host)
        self._buffered -= n
        if n:
            self._changed.set()
        return n

    def waiting_parked(self) -> dict[str, float]:
        """Parked hosts that have DIDs waiting here -> the park's end (epoch seconds)."""
        parked = self._parked()
        return {h: parked[h] for h in self._turns if h in parked}

    async def take(self) -> tuple[str, T] | None:
        """The next (host, did) to work, waiting while every host with DIDs is parked or full."""
        while True:
            picked = self._pick()
            if picked is not None:
                return picked
            if self._closed and not self._buffered:
                return None
            parked = self.waiting_parked()
            timeout = max(0.05, min(parked.values()) - time.time()) if parked else None
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass

    def _pick(self) -> tuple[str, T] | None:
        parked = self._parked()
        now = time.time()
        for _ in range(len(self._turns)):
            host = self._turns[0]
            self._turns.rotate(-1)
            counts = self._hosts[host]
            if counts.in_flight >= self._per_host or parked.get(host, 0.0) > now:
                continue
            did = counts.queued.popleft()
            if not counts.queued:
                self._turns.remove(host)
            counts.in_flight += 1
            self._buffered -= 1
            return host, did
        return None

    def idle(self) -> bool:
        """Nothing waits here and nothing is in flight."""
        return not self._buffered and not any(c.in_flight for c in self._hosts.values())

    async def wait_settled(self) -> None:
        """Return once nothing is in flight (what waits here stays)."""
        while any(c.in_flight for c in self._hosts.values()):
            self._changed.clear()
            await self._changed.wait()

    def release(self, host: str, *, ok: bool) -> None:
        """The DID taken from `host` is finished (`ok`: backfilled; else failed or deferred)."""
        counts = self._hosts[host]
        counts.in_flight -= 1
        if ok:
            counts.done += 1
        else:
            counts.failed += 1
        self._changed.set()

    def counts(self) -> dict[str, dict[str, int]]:
        """Per host: queued, in_flight, parked (0/1), done, failed."""
        parked = self._parked()
        return {h: {"queued": len(c.queued), "in_flight": c.in_flight, "parked": int(h in parked),
                    "done": c.done, "failed": c.failed} for h, c in self._hosts.items()}

    def export_metrics(self) -> None:
        """Set the per-host gauges: the TOP_HOSTS hosts by queued DIDs by name, the rest as 'other'."""
        counts = self.counts()
        top = sorted(counts, key=lambda h: (-counts[h]["queued"], -counts[h]["in_flight"], h))[:TOP_HOSTS]
        other = {"queued": 0, "in_flight": 0, "parked": 0, "done": 0, "failed": 0}
        for host, c in counts.items():
            if host not in top:
                for k, n in c.items():
                    other[k] += n
        metrics.BACKFILL_HOST_REPOS.clear()
        for host in top:
            for state, n in counts[host].items():
                metrics.BACKFILL_HOST_REPOS.labels(host=host or "unknown", state=state).set(n)
        for state, n in other.items():
            metrics.BACKFILL_HOST_REPOS.labels(host="other", state=state).set(n)
