"""Read-only summaries of the store for `skyfill status` and the admin API."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

from .states import CoverageEnd

__all__ = ["status_report"]


class _Reads(Protocol):
    def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]: ...


# Each of these views is read ONCE per report and the counts are split here: every read of a view on a
# lake folds its log (record_log, repo_log: many small Parquet files under a busy writer) again, so
# the six reads the report used to make cost ~six times one (200k records, 20k DIDs, 2,000 commits:
# 10.6 s -> 3.4 s; the note in _notes/crash.md has the numbers).
_REPO_COUNTS = "SELECT sync_state, status, coalesce(backfill_status, 'never'), count(*) FROM repos GROUP BY ALL"
_RECORD_COUNTS = "SELECT collection, count(*) FROM records GROUP BY 1"


def _by_key(counts: dict[Any, int]) -> dict[Any, int]:
    """Ordered by key, NULL last (as ORDER BY 1 ordered them)."""
    return dict(sorted(counts.items(), key=lambda kv: (kv[0] is None, kv[0] if kv[0] is not None else "")))


def _repo_counts(rows: Callable[[str], list[tuple[Any, ...]]]) -> dict[str, Any]:
    by_sync: dict[Any, int] = {}
    by_status: dict[Any, int] = {}
    by_backfill: dict[Any, int] = {}
    for sync_state, status, backfill, n in rows(_REPO_COUNTS):
        by_sync[sync_state] = by_sync.get(sync_state, 0) + n
        by_status[status] = by_status.get(status, 0) + n
        by_backfill[backfill] = by_backfill.get(backfill, 0) + n
    return {"total": sum(by_sync.values()), "by_sync_state": _by_key(by_sync), "by_status": _by_key(by_status),
            "by_backfill_status": _by_key(by_backfill)}


def _record_counts(rows: Callable[[str], list[tuple[Any, ...]]]) -> dict[str, Any]:
    counts = rows(_RECORD_COUNTS)
    ordered = sorted(counts, key=lambda r: (-r[1], r[0] is None, r[0] if r[0] is not None else ""))
    return {"total": sum(n for _, n in counts), "by_collection": dict(ordered)}


def status_report(reader: _Reads) -> dict[str, Any]:
    """Cursor, lag, repos by sync state and status, records by collection, queue and coverage.

    `reader`: a `Store` or one of its `read()` cursors. A DuckDB failure leaves as StorageError."""
    now = datetime.now(UTC)

    def rows(sql: str) -> list[tuple[Any, ...]]:
        return reader.fetchall(sql)

    cursors = [
        {"source": s, "seq": q, "updated_at": u.isoformat() if u else None}
        for s, q, u in rows("SELECT source, arg_max(seq, updated_at), max(updated_at) FROM cursors GROUP BY source "
                                  "ORDER BY source")
    ]
    last = rows(
        "SELECT source, last_event_at, ended, started_at, stopped_at, first_seq, last_seq "
        "FROM coverage ORDER BY id DESC LIMIT 1"
    )
    lag = None
    running = None
    if last:
        _, last_event_at, ended, *_ = last[0]
        running = ended == CoverageEnd.RUNNING.value
        if last_event_at is not None:
            lag = round((now - last_event_at).total_seconds(), 3)
    repos, records = _repo_counts(rows), _record_counts(rows)
    return {
        "cursors": cursors,
        "lag_seconds": lag,
        "consumer_running": running,
        "repos": repos,
        "records": records,
        "backfill_queue": dict(rows("SELECT state, count(*) FROM backfill_queue GROUP BY 1 ORDER BY 1")),
        "coverage": [
            {
                "source": s, "first_seq": fs, "last_seq": ls,
                "first_event_at": fe.isoformat() if fe else None,
                "last_event_at": le.isoformat() if le else None,
                "started_at": st.isoformat(), "stopped_at": sp.isoformat() if sp else None, "ended": e,
            }
            for s, fs, ls, fe, le, st, sp, e in rows(
                "SELECT source, first_seq, last_seq, first_event_at, last_event_at, started_at, stopped_at, ended "
                "FROM coverage ORDER BY id DESC LIMIT 5"
            )
        ],
    }
