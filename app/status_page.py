"""The status page's model: everything the page shows for a window, read once.

    report      `storage.status.status_report` (cursor, lag, repos by state, records, queue)
    timeline    `storage.timeline.timeline_report`: coverage spans, repairs per bucket and reason,
                the queue per host
    downtime    the window's stretches no consumer run covered (`backfill.gaps.downtime_spans`)
    to_repair   `detect_gaps` for the window without a PDS audit: DIDs per reason a backfill still
                needs. Downtime DIDs by the no-audit margin rule, less those a backfill reconciled
                after the window's last downtime stretch ended (that rule looks at event times only)
    history     ingest rate and lag over time: the daemon's ring (`live.IngestHistory`, every 10 s
                for 24 h) when a daemon renders the page, else one average per consumer run from
                the coverage rows (seq/s between its first and last event; the lag it stopped at)
    hosts       backfill DIDs per host and state: the daemon's gauges while a backfill runs in it,
                else the queue per host; `parked`: hosts parked by rate limits (daemon only)

`build_page` runs the reads in a worker thread (a daemon's loop keeps running); `render` turns the
model into one self-contained HTML document (status_html.py).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from skyfill.backfill.config import parse_when
from skyfill.backfill.gaps import GapReport, Reason, detect_gaps, downtime_spans
from skyfill.errors import ConfigError
from skyfill.storage import Store
from skyfill.storage.status import status_report
from skyfill.storage.timeline import Timeline, backfilled_since, timeline_report

from .live import IngestHistory, Point, backfill_hosts

__all__ = ["StatusPage", "HistoryPoint", "page_window", "build_page", "DEFAULT_WINDOW"]

DEFAULT_WINDOW: Final = timedelta(hours=24)
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    at: datetime
    rate: float            # events per second
    lag: float | None      # seconds


@dataclass(frozen=True, slots=True)
class StatusPage:
    generated_at: datetime
    since: datetime
    until: datetime
    source: str                                   # "daemon" or the database path
    report: dict[str, Any]
    timeline: Timeline
    downtime: tuple[tuple[datetime, datetime], ...]
    to_repair: dict[str, int]                     # DIDs a backfill still needs, per reason
    to_repair_total: int
    history: tuple[HistoryPoint, ...]
    history_kind: str                             # "live" (10 s samples) | "runs" (per-run averages)
    hosts: tuple[tuple[str, dict[str, int]], ...]
    hosts_kind: str                               # "live" (this backfill) | "queue" (the stored queue)
    parked: tuple[str, ...]
    build_seconds: float = 0.0                    # how long the reads took

    @property
    def downtime_seconds(self) -> float:
        return sum((b - a).total_seconds() for a, b in self.downtime)

    @property
    def covered_fraction(self) -> float:
        """Share of the window (up to now) that consumer runs covered."""
        end = min(self.until, self.generated_at)
        total = (end - self.since).total_seconds()
        return 1.0 if total <= 0 else max(0.0, 1.0 - self.downtime_seconds / total)


def _when(value: str, now: datetime, *, end: bool) -> datetime:
    text = value.strip()
    if text == "now":
        return now
    m = _RELATIVE.match(text)
    if m:  # "6h": that long before now
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    return parse_when(text, end_of_day=end)


def page_window(query: Mapping[str, str], now: datetime | None = None) -> tuple[datetime, datetime]:
    """`since`/`until` from a query (ISO 8601, a date, `now`, or a span before now like `6h`, `7d`);
    the default is the last 24 h. ConfigError when they do not parse or are reversed."""
    now = now or datetime.now(UTC)
    until = _when(query["until"], now, end=True) if query.get("until") else now
    since = _when(query["since"], now, end=False) if query.get("since") else until - DEFAULT_WINDOW
    if until <= since:
        raise ConfigError(f"until {until.isoformat()} is not after since {since.isoformat()}")
    return since, until


def _runs_history(timeline: Timeline, now: datetime) -> list[HistoryPoint]:
    """One step per consumer run: its average seq/s, and the lag it ended with."""
    out: list[HistoryPoint] = []
    for span in timeline.spans:
        a, b = span.first_event_at, span.last_event_at
        if a is None or b is None or span.first_seq is None or span.last_seq is None:
            continue
        seconds = (b - a).total_seconds()
        rate = (span.last_seq - span.first_seq) / seconds if seconds > 0 else 0.0
        ended = now if span.running else (span.stopped_at or b)
        lag = max(0.0, (ended - b).total_seconds())
        out += [HistoryPoint(a, rate, None), HistoryPoint(b, rate, lag)]
    return out


def _live_history(points: list[Point]) -> list[HistoryPoint]:
    return [HistoryPoint(p.at, p.stored_per_s, p.lag) for p in points]


def _still_to_repair(store: Store, gaps: GapReport) -> dict[str, int]:
    """DIDs per reason (and "total"), less the downtime DIDs backfilled after the last downtime stretch."""
    counts = dict(gaps.counts)
    downtime = [did for did, reasons in gaps.reasons_by_did.items() if Reason.DOWNTIME.value in reasons]
    if not gaps.downtime or not downtime:
        return {**counts, "total": gaps.total}
    with store.read() as reader:
        repaired = backfilled_since(reader, downtime, max(b for _, b in gaps.downtime))
    counts[Reason.DOWNTIME.value] -= len(repaired)
    gone = sum(1 for did in repaired if gaps.reasons_by_did[did] == (Reason.DOWNTIME.value,))
    return {**counts, "total": gaps.total - gone}


async def build_page(store: Store, *, since: datetime, until: datetime, source: str,
                     history: IngestHistory | None = None, now: datetime | None = None) -> StatusPage:
    """Read the model for [since, until] from `store`; `history`: the daemon's ring (None: from a file)."""
    now = now or datetime.now(UTC)
    started = time.perf_counter()

    def read() -> tuple[dict[str, Any], Timeline]:
        with store.read() as reader:
            return status_report(reader), timeline_report(reader, since=since, until=until)

    report, timeline = await asyncio.to_thread(read)
    spans = [(s.first_event_at, s.last_event_at, s.running) for s in timeline.spans]
    downtime = tuple(downtime_spans(spans, start=since, end=until, now=now))
    gaps = await detect_gaps(store, start=since, end=until, audit=None, now=now)
    to_repair = await asyncio.to_thread(_still_to_repair, store, gaps)
    live_hosts, parked = backfill_hosts() if history is not None else ([], [])
    return StatusPage(
        generated_at=now, since=since, until=until, source=source, report=report, timeline=timeline,
        downtime=downtime,
        to_repair={k: v for k, v in to_repair.items() if k != "total" and v}, to_repair_total=to_repair["total"],
        history=tuple(_live_history(history.points(since, until)) if history is not None
                      else _runs_history(timeline, now)),
        history_kind="live" if history is not None else "runs",
        hosts=tuple(live_hosts) if live_hosts else timeline.queue_by_host,
        hosts_kind="live" if live_hosts else "queue",
        parked=tuple(parked),
        build_seconds=time.perf_counter() - started,
    )
