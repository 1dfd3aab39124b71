"""Read-only summaries of the store for `skyfill status` and the admin API."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

from .states import CoverageEnd

__all__ = ["status_report"]


class _Reads(Protocol):
    def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]: ...


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
    return {
        "cursors": cursors,
        "lag_seconds": lag,
        "consumer_running": running,
        "repos": {
            "total": rows("SELECT count(*) FROM repos")[0][0],
            "by_sync_state": dict(rows("SELECT sync_state, count(*) FROM repos GROUP BY 1 ORDER BY 1")),
            "by_status": dict(rows("SELECT status, count(*) FROM repos GROUP BY 1 ORDER BY 1")),
            "by_backfill_status": dict(
                rows("SELECT coalesce(backfill_status, 'never'), count(*) FROM repos GROUP BY 1 ORDER BY 1")
            ),
        },
        "records": {
            "total": rows("SELECT count(*) FROM records")[0][0],
            "by_collection": dict(
                rows("SELECT collection, count(*) FROM records GROUP BY 1 ORDER BY 2 DESC, 1")
            ),
        },
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
