"""Read-only time series of the store for the status page: what happened in a window [since, until].

    spans       the coverage rows (consumer runs) that overlap the window, oldest first
    repaired    backfills that ended in the window: per time bucket, ok and failed (repos.backfilled_at
                for a reconciled repo, backfill_queue.updated_at for the queue's failures), and the
                queue rows done in the window by the reason they were enqueued for
    queue       the backfill queue by host and state (the `host` the queue recorded at enqueue)

It reads `coverage` and the `repos` view once each, the `backfill_queue` view three times; times are
aware UTC datetimes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import pyarrow as pa

from .base import Reader
from .repos import KEY_SQL, subset_sql
from .states import BackfillStatus, CoverageEnd, QueueState

__all__ = ["CoverageSpan", "Timeline", "timeline_report", "backfilled_since"]


class _Reads(Protocol):
    def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]: ...


@dataclass(frozen=True, slots=True)
class CoverageSpan:
    """One consumer run: the firehose it covered (event times and seqs) and how it ended."""

    source: str
    first_seq: int | None
    last_seq: int | None
    first_event_at: datetime | None
    last_event_at: datetime | None
    started_at: datetime
    stopped_at: datetime | None
    ended: str

    @property
    def running(self) -> bool:
        return self.ended == CoverageEnd.RUNNING.value


@dataclass(frozen=True, slots=True)
class Timeline:
    spans: tuple[CoverageSpan, ...]
    repaired_buckets: tuple[tuple[datetime, int, int], ...]   # (bucket start, backfills ok, failed)
    repaired_ok: int                                          # repos reconciled (backfill ok) in the window
    repaired_failed: int                                      # repos whose backfill failed in the window
    repaired_by_reason: dict[str, int]                        # queue rows done in the window, per enqueue reason
    queue_by_host: tuple[tuple[str, dict[str, int]], ...]     # (host, {state: DIDs}), most queued first
    retrying: int                                             # repos waiting for a retry (backfill_retry_after)
    bucket_seconds: float                                     # width of a repaired bucket


_SPANS_SQL = """
SELECT source, first_seq, last_seq, first_event_at, last_event_at, started_at, stopped_at, ended
FROM coverage
WHERE coalesce(first_event_at, started_at) <= ?
  AND (ended = ? OR coalesce(last_event_at, stopped_at, started_at) >= ?)
ORDER BY id
"""

# seconds since the epoch, floored to the bucket: a bucket is `{step}` seconds wide, counted from {s0}
# (both floats the caller computed, formatted in: no user text reaches the SQL)
_BUCKET = "to_timestamp({s0!r} + floor((epoch({col}) - {s0!r}) / {step!r}) * {step!r})"

# One read of the `repos` view for the window's repairs AND the retrying count: on a lake every read of
# the view folds repo_log (many small Parquet files under a busy writer) again. A row outside the
# window (a retrying repo) has no bucket (NULL) and counts only as retrying.
_REPAIRED_SQL = f"""
SELECT CASE WHEN in_window THEN {{bucket_backfilled}} END AS b,
       count(*) FILTER (WHERE in_window AND ok),
       count(*) FILTER (WHERE in_window AND NOT ok),
       count(*) FILTER (WHERE retrying)
FROM (
    SELECT backfilled_at, coalesce(backfilled_at >= ? AND backfilled_at <= ?, false) AS in_window,
           coalesce(backfill_status = '{BackfillStatus.OK.value}', false) AS ok,
           coalesce(backfill_status = '{BackfillStatus.RETRYING.value}', false) AS retrying
    FROM repos WHERE (backfilled_at >= ? AND backfilled_at <= ?) OR backfill_status = '{BackfillStatus.RETRYING.value}'
)
GROUP BY 1 ORDER BY 1
"""

_QUEUE_FAILED_SQL = f"""
SELECT {{bucket_updated}} AS b, count(*)
FROM backfill_queue WHERE state = '{QueueState.FAILED.value}' AND updated_at >= ? AND updated_at <= ?
GROUP BY 1 ORDER BY 1
"""

_BY_REASON_SQL = f"""
SELECT reason, count(*) FROM (
    SELECT unnest(reasons) AS reason FROM backfill_queue
    WHERE state = '{QueueState.DONE.value}' AND updated_at >= ? AND updated_at <= ?
) GROUP BY 1 ORDER BY 2 DESC, 1
"""

_QUEUE_BY_HOST_SQL = """
SELECT coalesce(host, '(unknown)') AS h, state, count(*) FROM backfill_queue GROUP BY 1, 2
"""


def timeline_report(reader: _Reads, *, since: datetime, until: datetime, buckets: int = 48,
                    max_hosts: int = 20) -> Timeline:
    """The window's coverage spans, repairs and the backfill queue per host (see the module doc).

    `reader`: a Store or one of its `read()` cursors. `buckets`: how many time buckets the repairs
    are counted in; `max_hosts`: hosts listed by name (most queued + in progress first), the rest
    summed as "other"."""
    step = float(max(1.0, (until - since).total_seconds() / max(1, buckets)))
    s0 = float(since.timestamp())
    window = [since, until]
    spans = tuple(CoverageSpan(*row) for row in reader.fetchall(_SPANS_SQL, [until, CoverageEnd.RUNNING.value, since]))
    bucket = {"bucket_backfilled": _BUCKET.format(s0=s0, step=step, col="backfilled_at"),
              "bucket_updated": _BUCKET.format(s0=s0, step=step, col="updated_at")}
    per_bucket: dict[datetime, list[int]] = {}
    retrying = 0
    for b, ok, failed, retry in reader.fetchall(_REPAIRED_SQL.format(**bucket), window + window):
        retrying += retry
        if b is None:
            continue
        counts = per_bucket.setdefault(b, [0, 0])
        counts[0] += ok
        counts[1] += failed
    for b, failed in reader.fetchall(_QUEUE_FAILED_SQL.format(**bucket), window):
        per_bucket.setdefault(b, [0, 0])[1] += failed
    hosts: dict[str, dict[str, int]] = {}
    for host, state, n in reader.fetchall(_QUEUE_BY_HOST_SQL):
        hosts.setdefault(host, {})[state] = n
    ranked = sorted(hosts.items(), key=lambda kv: (-(kv[1].get(QueueState.PENDING.value, 0)
                                                     + kv[1].get(QueueState.IN_PROGRESS.value, 0)),
                                                   -sum(kv[1].values()), kv[0]))
    shown, rest = ranked[:max_hosts], ranked[max_hosts:]
    if rest:
        other: dict[str, int] = {}
        for _, states in rest:
            for state, n in states.items():
                other[state] = other.get(state, 0) + n
        shown.append((f"other ({len(rest)} hosts)", other))
    buckets_out = tuple((b, ok, failed) for b, (ok, failed) in sorted(per_bucket.items()))
    return Timeline(
        spans=spans,
        repaired_buckets=buckets_out,
        repaired_ok=sum(ok for _, ok, _ in buckets_out),
        repaired_failed=sum(failed for _, _, failed in buckets_out),
        repaired_by_reason=dict(reader.fetchall(_BY_REASON_SQL, window)),
        queue_by_host=tuple(shown),
        retrying=retrying,
        bucket_seconds=step,
    )


_BACKFILLED_SQL = f"""
WITH wanted AS MATERIALIZED (SELECT DISTINCT {KEY_SQL} AS k FROM _dids)
SELECT r.did FROM ({subset_sql(keys="SELECT k FROM wanted")}) r JOIN _dids d ON d.did = r.did
WHERE r.backfilled_at >= ? AND r.backfill_status = '{BackfillStatus.OK.value}'
"""


def backfilled_since(reader: Reader, dids: Iterable[str], since: datetime) -> set[str]:
    """Those of `dids` whose repo a backfill reconciled (ok) at or after `since`, found by key."""
    table = pa.table({"did": pa.array(list(dids), pa.string())})
    if not table.num_rows:
        return set()
    with reader.registered("_dids", table):
        return {did for (did,) in reader.fetchall(_BACKFILLED_SQL, [since])}
