"""What the daemon saw, counted: per kind for its callers (`counts`) and for Prometheus.

Per-event counters are summed here and added to Prometheus once per batch or tick (`export`):
a labelled .inc() per event cost more than the tracker.
"""

from __future__ import annotations

from skyfill import metrics
from skyfill.protocol.events import Account, Commit, Identity, Sync

__all__ = ["EventCounters"]

_TYPE_NAMES: dict[type, str] = {Commit: "commit", Sync: "sync", Identity: "identity", Account: "account"}

# Every type's series exists from the start, at 0: a rate() over a series that is born at its first
# event misses that event, and a dashboard panel shows nothing instead of 0.
for _name in _TYPE_NAMES.values():
    metrics.FIREHOSE_EVENTS.labels(_name)


class EventCounters:
    def __init__(self) -> None:
        # verdict values, "error:<kind>" for skipped frames and events, "unverifiable"
        self.counts: dict[str, int] = {}
        self._types: dict[str, int] = {}
        self._verdicts: dict[str, int] = {}

    def applied(self, event: Commit | Sync | Identity | Account, verdict: str) -> None:
        """An event given to the tracker, and its verdict."""
        types = self._types
        name = _TYPE_NAMES.get(type(event), "other")
        types[name] = types.get(name, 0) + 1
        self.counts[verdict] = self.counts.get(verdict, 0) + 1
        verdicts = self._verdicts
        verdicts[verdict] = verdicts.get(verdict, 0) + 1

    def error(self, kind: str) -> None:
        """A frame or event skipped as bad input."""
        metrics.FIREHOSE_ERRORS.labels(kind).inc()
        self.counts["error:" + kind] = self.counts.get("error:" + kind, 0) + 1

    def unverifiable(self) -> None:
        """A commit applied although no proof was possible (see consumer/verify.py)."""
        self.counts["unverifiable"] = self.counts.get("unverifiable", 0) + 1
        metrics.FIREHOSE_UNVERIFIABLE.inc()

    def export(self, last_seq: int | None) -> None:
        """Add what was summed since the last export to Prometheus."""
        for name, n in self._types.items():
            metrics.FIREHOSE_EVENTS.labels(name).inc(n)
        for name, n in self._verdicts.items():
            metrics.FIREHOSE_VERDICTS.labels(name).inc(n)
        self._types.clear()
        self._verdicts.clear()
        if last_seq is not None:
            metrics.FIREHOSE_LAST_SEQ.set(last_seq)
