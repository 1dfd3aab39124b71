"""What only a running daemon knows, for the status page: its ingest history and its backfill hosts.

The store keeps no ingest rate nor lag over time (the coverage rows hold one span per consumer
run), so the daemon samples its own metrics into a ring: every `interval` seconds (10 s) for
`keep` (24 h: 8640 samples, a few hundred kB). A restart starts an empty ring; a page written
from a file without a daemon (`skyfill status --html`) shows per-run averages from the coverage
rows instead. The backfill hosts (DIDs per host and state, parked hosts) are the
`skyfill_backfill_host_repos` gauges of the backfill that runs in this process.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from skyfill import metrics

__all__ = ["Sample", "IngestHistory", "backfill_hosts"]


@dataclass(frozen=True, slots=True)
class Sample:
    at: float                # epoch seconds
    received: float          # firehose frames received so far (every type)
    stored: float            # events committed to the store so far
    lag: float | None        # seconds behind the firehose (None before the first event)
    seq: float | None        # last seq processed
    connected: bool


@dataclass(frozen=True, slots=True)
class Point:
    at: datetime
    received_per_s: float
    stored_per_s: float
    lag: float | None


def _counter_sum(name: str) -> float:
    total = 0.0
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def read_sample(now: float | None = None) -> Sample:
    """The metrics of this process now."""
    get = metrics.REGISTRY.get_sample_value
    seq = get("skyfill_firehose_last_seq")
    return Sample(
        at=time.time() if now is None else now,
        received=_counter_sum("skyfill_firehose_events_total"),
        stored=get("skyfill_storage_batch_events_total") or 0.0,
        lag=get("skyfill_firehose_lag_seconds") if seq else None,
        seq=seq or None,
        connected=bool(get("skyfill_firehose_connected")),
    )


class IngestHistory:
    """A ring of `Sample`s, one every `interval` seconds, the last `keep` of them."""

    def __init__(self, *, interval: float = 10.0, keep: timedelta = timedelta(hours=24)) -> None:
        self.interval = interval
        self.samples: deque[Sample] = deque(maxlen=max(2, int(keep.total_seconds() / interval)))

    def sample(self, now: float | None = None) -> None:
        self.samples.append(read_sample(now))

    async def run(self) -> None:
        """Sample now and every `interval` seconds until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def points(self, since: datetime, until: datetime) -> list[Point]:
        """Rates between consecutive samples (per second) and the lag, for samples inside the window."""
        lo, hi = since.timestamp(), until.timestamp()
        out: list[Point] = []
        items = list(self.samples)
        for before, after in zip(items, items[1:], strict=False):
            if not lo <= after.at <= hi:
                continue
            dt = after.at - before.at
            if dt <= 0:
                continue
            out.append(Point(
                at=datetime.fromtimestamp(after.at, UTC),
                received_per_s=max(0.0, after.received - before.received) / dt,
                stored_per_s=max(0.0, after.stored - before.stored) / dt,
                lag=after.lag,
            ))
        return out


def backfill_hosts() -> tuple[list[tuple[str, dict[str, int]]], list[str]]:
    """(per host: {state: DIDs}, parked hosts) from this process's backfill gauges; hosts with
    DIDs queued or in flight first."""
    hosts: dict[str, dict[str, int]] = {}
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            if sample.name == "skyfill_backfill_host_repos":
                host, state = sample.labels.get("host", "?"), sample.labels.get("state", "?")
                hosts.setdefault(host, {})[state] = int(sample.value)
    parked = sorted(h for h, states in hosts.items() if states.get("parked"))
    ranked = sorted(hosts.items(), key=lambda kv: (-(kv[1].get("queued", 0) + kv[1].get("in_flight", 0)),
                                                   -kv[1].get("done", 0), kv[0]))
    shown = [(h, {k: v for k, v in states.items() if k != "parked"}) for h, states in ranked
             if any(v for k, v in states.items() if k != "parked")]
    return shown, parked
