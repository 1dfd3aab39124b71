"""What a backfill run did: the running tally, its final `BackfillSummary`, and the terminal display."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["BackfillSummary", "Tally", "display"]


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


@contextmanager
def display(
    tally: Tally, *, enabled: bool, parked_hosts: Callable[[], Any], total: int | None = None
) -> Iterator[Callable[[], None]]:
    """A progress bar on the terminal while the run goes (when `enabled`), with an ETA when the
    `total` is known (a queue run); yields `tick()`, to call whenever a DID is done."""
    if not enabled:
        yield lambda: None
        return
    with Progress(
        TextColumn("backfill"),
        BarColumn(),
        TextColumn("{task.completed} repos  {task.fields[records]} records  {task.fields[parked]} hosts parked"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task("repos", total=total, records=0, parked=0)

        def tick() -> None:
            done = tally.ok + sum(tally.failed.values())
            records = tally.added + tally.updated + tally.deleted + tally.unchanged
            bar.update(task, completed=done, records=records, parked=len(parked_hosts()))

        yield tick
