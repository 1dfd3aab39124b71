"""What a run did and how far it is: a backfill's running tally and final `BackfillSummary`, and
the phases of a run (backfill, discover, identities sync), each with its count and ETA, shown as
progress bars on a terminal and as a log line every 30 s elsewhere (`report`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["BackfillSummary", "Tally", "Phase", "Phases", "report", "LOG_EVERY", "set_log_every"]

log = logging.getLogger(__name__)

LOG_EVERY = 30.0   # seconds between progress log lines off a terminal (`skyfill --progress-every`)


def set_log_every(seconds: float) -> None:
    """How often `report` logs progress off a terminal, for the runs started from now on."""
    global LOG_EVERY
    LOG_EVERY = seconds


@dataclass(frozen=True, slots=True)
class BackfillSummary:
    repos_ok: int
    failed: dict[str, int]          # outcome -> repos (terminal statuses, 'retrying', 'deferred')
    records_added: int
    records_updated: int
    records_deleted: int
    records_unchanged: int
    elapsed: float                  # seconds
    hosts_parked: int               # hosts parked by rate limits at some point during the run

    @property
    def repos_failed(self) -> int:
        return sum(self.failed.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "repos_ok": self.repos_ok,
            "repos_failed": self.repos_failed,
            "failed": dict(sorted(self.failed.items())),
            "records": {
                "added": self.records_added,
                "updated": self.records_updated,
                "deleted": self.records_deleted,
                "unchanged": self.records_unchanged,
            },
            "elapsed_s": round(self.elapsed, 3),
            "hosts_parked": self.hosts_parked,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackfillSummary:
        records = data["records"]
        return cls(
            repos_ok=data["repos_ok"], failed=dict(data["failed"]), records_added=records["added"],
            records_updated=records["updated"], records_deleted=records["deleted"],
            records_unchanged=records["unchanged"], elapsed=data["elapsed_s"], hosts_parked=data["hosts_parked"],
        )


@dataclass(slots=True)
class Tally:
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    added: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    parked: set[str] = field(default_factory=set)

    def fail(self, outcome: str) -> None:
        self.failed[outcome] = self.failed.get(outcome, 0) + 1

    def summary(self, elapsed: float) -> BackfillSummary:
        return BackfillSummary(
            repos_ok=self.ok, failed=dict(self.failed), records_added=self.added, records_updated=self.updated,
            records_deleted=self.deleted, records_unchanged=self.unchanged, elapsed=elapsed,
            hosts_parked=len(self.parked),
        )


@dataclass(slots=True)
class Phase:
    """One phase of a run (resolving identities, fetching repos, ...): its count and, when its
    total is known, an ETA from its own rate since it began (its first step)."""

    name: str
    total: int | None = None
    done: int = 0
    began: float | None = None      # monotonic time of the first step

    def advance(self, n: int = 1) -> None:
        if self.began is None:
            self.began = time.monotonic()
        self.done += n

    def rate(self, now: float) -> float:
        if self.began is None or self.done == 0:
            return 0.0
        return self.done / max(1e-3, now - self.began)

    def eta(self, now: float) -> float | None:
        """Seconds left at the current rate (None: no total or no rate yet; 0 when done)."""
        if self.total is None:
            return None
        left = self.total - self.done
        if left <= 0:
            return 0.0
        rate = self.rate(now)
        return left / rate if rate > 0 else None

    def to_json(self, now: float) -> dict[str, Any]:
        eta = self.eta(now)
        return {"done": self.done, "total": self.total, "per_s": round(self.rate(now), 2),
                "eta_s": None if eta is None else round(eta)}


class Phases:
    """The phases of one run, in order; `phases["repos"].advance()` as work completes."""

    def __init__(self, *names: str, totals: dict[str, int | None] | None = None) -> None:
        self._phases = {n: Phase(n, (totals or {}).get(n)) for n in names}

    def __getitem__(self, name: str) -> Phase:
        return self._phases[name]

    def __iter__(self) -> Iterator[Phase]:
        return iter(self._phases.values())

    def to_json(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {p.name: p.to_json(now) for p in self}


Extra = Callable[[], dict[str, Any]]


@asynccontextmanager
async def _repeating(loop: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Run `loop()` as a task while the block runs; cancel and await it after."""
    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@asynccontextmanager
async def report(
    phases: Phases, *, what: str, terminal: bool, extra: Extra = dict, every: float | None = None
) -> AsyncIterator[None]:
    """While the block runs: on a terminal, one progress bar per phase, each with its count and
    ETA; elsewhere a log line "<what> progress" every `every` seconds with the same numbers (ctx:
    one object per phase: done, total, per_s, eta_s; plus `extra()`, e.g. records, hosts parked).
    `every` defaults to LOG_EVERY (read at the call)."""
    if not terminal:
        period = LOG_EVERY if every is None else every

        async def lines() -> None:
            while True:
                await asyncio.sleep(period)
                log.info("%s progress", what, extra={"ctx": {"phases": phases.to_json(), **extra()}})

        async with _repeating(lines):
            yield
        return
    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[extra]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  transient=False) as bar:
        ids = {p.name: bar.add_task(f"{what} {p.name}", total=p.total, extra="") for p in phases}
        last = list(ids)[-1]  # the extra numbers go on the last phase's line

        def refresh() -> None:
            more = "  ".join(f"{k} {v}" for k, v in extra().items())
            for p in phases:
                bar.update(ids[p.name], completed=p.done, total=p.total, extra=more if p.name == last else "")

        async def refresher() -> None:
            while True:
                refresh()
                await asyncio.sleep(0.5)

        try:
            async with _repeating(refresher):
                yield
        finally:
            refresh()
