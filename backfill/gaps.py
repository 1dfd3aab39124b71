"""The gap detector: which DIDs need a backfill for a time window, and why.

Each reason is one DuckDB set query over `repos`, `records`, `coverage` and `identities`;
Python only merges the DID sets. A DID may carry several reasons.

    desynchronized    the chain broke (sync_state) at or before `end` and no backfill has
                      repaired it since (backfilled_at is null or older than desynced_at)
    never_backfilled  active in the window (first_seen_at <= end, last_event_at >= start) and
                      never reconciled from a full repo
    downtime          [start, end] overlaps a stretch no consumer run covered (the complement of
                      the coverage spans); DIDs first seen before such a stretch are audited
                      against their PDS (head rev moved past the held rev?) or, without an
                      auditor, flagged when their last event is within `no_audit_margin` of it
    referenced        DIDs that records seen in the window (event_at) liked, reposted, replied
                      to (parent and root), quoted or followed, whose repos were never backfilled.
                      The window is rounded outward to whole hours (UTC): the referenced DIDs are
                      kept per hour (storage/refs.py), so records seen in the hours around `start`
                      and `end` count too (a conservative superset), and so do records deleted
                      since they were seen; records outside those hours never count
    explicit          DIDs the caller named
    unseen, stale, filter_changed   the whole network (backfill/network.py): DIDs a discovery
                      listed that were never held or whose listed rev is newer than the held one,
                      and DIDs backfilled with a collections filter narrower than `collections`

Terminal outcomes are not retried by accident: every automatic reason skips DIDs whose last
backfill ended in a terminal status (RepoTakendown, SignatureFailed, ...), except
`desynchronized` for accounts whose status is `active` again: a broken chain on an active
account is new evidence. `explicit` always wins.

Downtime worked example: coverage spans [09:00, 10:00] and [10:00:02, 14:00], window
[08:00, 12:00] -> downtime [08:00, 09:00] only; the 2 s between the spans is shorter than
`min_downtime` (the spacing of events across a resumed cursor, not an outage).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa

from skyfill.errors import ConfigError, FetchError, IdentityError, StorageError, SyntaxError_
from skyfill.protocol.syntax import is_did
from skyfill.storage import CoverageEnd, Reader, Store
from skyfill.storage.queries import DESYNCHRONIZED, not_terminal
from skyfill.storage.refs import REFERENCED_SQL
from skyfill.storage.repos import KEY_SQL, subset_sql

from . import network

if TYPE_CHECKING:
    from skyfill.net.identity import Resolver
    from skyfill.net.pds import PdsClient

log = logging.getLogger(__name__)

__all__ = [
    "Reason",
    "GapReport",
    "Auditor",
    "HeldRevs",
    "UNKNOWN_HOST",
    "detect_gaps",
    "PdsAuditor",
    "downtime_spans",
]

# Audit input: {pds endpoint: [(did, held rev or None)]}. DIDs whose PDS is not in the
# identity cache are grouped under UNKNOWN_HOST; the auditor resolves them.
HeldRevs = Mapping[str, Sequence[tuple[str, str | None]]]
Auditor = Callable[[HeldRevs], Awaitable[set[str]]]
UNKNOWN_HOST: Final = ""

DEFAULT_NO_AUDIT_MARGIN: Final = timedelta(hours=24)
DEFAULT_MIN_DOWNTIME: Final = timedelta(seconds=5)





class Reason(StrEnum):
    DESYNCHRONIZED = "desynchronized"
    NEVER_BACKFILLED = "never_backfilled"
    DOWNTIME = "downtime"
    REFERENCED = "referenced"
    UNSEEN = network.UNSEEN
    STALE = network.STALE
    FILTER_CHANGED = network.FILTER_CHANGED
    EXPLICIT = "explicit"


_ORDER: Final = {r.value: i for i, r in enumerate(Reason)}


@dataclass(frozen=True, slots=True)
class GapReport:
    start: datetime
    end: datetime
    reasons_by_did: dict[str, tuple[str, ...]]
    counts: dict[str, int]                                  # DIDs per reason (every Reason present)
    downtime: tuple[tuple[datetime, datetime], ...] = ()    # uncovered stretches of the window
    audited: bool = False                                   # downtime DIDs were checked against PDSes
    audit_candidates: int = 0                               # DIDs known before a downtime stretch
    timings: dict[str, float] = field(default_factory=dict)  # seconds per reason

    @property
    def total(self) -> int:
        return len(self.reasons_by_did)

    def to_json(self, *, with_dids: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "total": self.total,
            "counts": dict(self.counts),
            "downtime": [[a.isoformat(), b.isoformat()] for a, b in self.downtime],
            "audited": self.audited,
        }
        if with_dids:
            out["dids"] = {did: list(reasons) for did, reasons in sorted(self.reasons_by_did.items())}
        return out


# Each reason reads `repos.subset_sql(<its condition on head columns>)` rather than the `repos`
# view: the same rows, but of the logged DIDs only those that may meet the condition are merged
# with their base rows (with a full repo_log, 230k DIDs at 100M, the view merged all of them for
# every reason: 4-6 s). The whole condition is applied on top, as on the view.
_DESYNC_HEAD: Final = f"{DESYNCHRONIZED} AND (desynced_at IS NULL OR desynced_at <= $end)"
_DESYNC_SQL: Final = f"""
SELECT did FROM ({subset_sql(_DESYNC_HEAD)})
WHERE {DESYNCHRONIZED}
  AND (desynced_at IS NULL OR desynced_at <= $end)
  AND (backfilled_at IS NULL OR desynced_at IS NULL OR backfilled_at < desynced_at)
  AND (status = 'active' OR {not_terminal()})
"""

_NEVER_SQL: Final = f"""
SELECT did FROM ({subset_sql("last_event_at >= $start AND active")})
WHERE first_seen_at <= $end AND last_event_at >= $start
  AND backfilled_at IS NULL AND active AND {not_terminal()}
"""

# The referenced DIDs come from storage/refs.py's table, filled when the records were written
# (the record_refs macro): no JSON is parsed here and no record is read. "Seen in the window" is
# the record's event time (when the network saw it), not its claimed createdAt, rounded outward
# to whole hours (the table keeps hours): a superset of the DIDs referenced inside [start, end].
# Only the `repos` rows of those DIDs are read, found by key.
_REFERENCED_SQL: Final = f"""
WITH dids AS MATERIALIZED ({REFERENCED_SQL}), wanted AS MATERIALIZED (SELECT DISTINCT {KEY_SQL} AS k FROM dids)
SELECT d.did FROM dids d LEFT JOIN ({subset_sql(keys="SELECT k FROM wanted")}) r ON r.did = d.did
WHERE r.did IS NULL OR (r.backfilled_at IS NULL AND r.active AND {not_terminal('r')})
"""

# DIDs that existed before some downtime stretch; `_gaps(gap_start, gap_end)` is registered.
_DOWNTIME_CANDIDATES_SQL: Final = f"""
SELECT r.did, r.rev, coalesce(i.pds, '{UNKNOWN_HOST}') AS pds
FROM ({subset_sql("active")}) r LEFT JOIN identities i ON i.did = r.did
WHERE r.active AND {not_terminal('r')}
  AND r.first_seen_at < (SELECT max(gap_start) FROM _gaps)
"""

# $low / $high: the first gap's start - margin, the last gap's end + margin (a necessary bound)
_DOWNTIME_NO_AUDIT_SQL: Final = f"""
SELECT DISTINCT r.did FROM ({subset_sql("active AND last_event_at >= $low AND last_event_at <= $high")}) r JOIN _gaps g
  ON r.first_seen_at < g.gap_start
 AND r.last_event_at >= g.gap_start - $margin
 AND r.last_event_at <= g.gap_end + $margin
WHERE r.active AND {not_terminal('r')}
"""


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def downtime_spans(
    spans: Iterable[tuple[datetime | None, datetime | None, bool]],
    *,
    start: datetime,
    end: datetime,
    now: datetime,
    min_downtime: timedelta = DEFAULT_MIN_DOWNTIME,
) -> list[tuple[datetime, datetime]]:
    """The parts of [start, min(end, now)] outside every (first_event_at, last_event_at) span.

    A span still running (third item True) covers up to `now`. Stretches shorter than
    `min_downtime` are not downtime.
    """
    end = min(_utc(end), _utc(now))
    start = _utc(start)
    covered = sorted(
        (_utc(a), _utc(now) if running else _utc(b))
        for a, b, running in spans
        if a is not None and (b is not None or running)
    )
    out: list[tuple[datetime, datetime]] = []
    cursor = start
    for a, b in covered:
        if cursor >= end:
            break
        if b <= cursor:
            continue
        if a > cursor:
            out.append((cursor, min(a, end)))
        cursor = max(cursor, b)
    if cursor < end:
        out.append((cursor, end))
    return [(a, b) for a, b in out if b - a >= min_downtime]


def _column(reader: Reader, sql: str, params: Mapping[str, Any]) -> list[str]:
    used = {k: v for k, v in params.items() if f"${k}" in sql}  # DuckDB refuses unused names
    table = reader.fetch_arrow(sql, used)
    return table.column(0).to_pylist() if table.num_rows else []


async def detect_gaps(
    store: Store,
    *,
    start: datetime,
    end: datetime,
    audit: Auditor | None,
    explicit_dids: Iterable[str] = (),
    no_audit_margin: timedelta = DEFAULT_NO_AUDIT_MARGIN,
    min_downtime: timedelta = DEFAULT_MIN_DOWNTIME,
    now: datetime | None = None,
    collections: Sequence[str] = (),
) -> GapReport:
    """Find the DIDs that need a backfill for [start, end] (both inclusive), with their reasons.

    The SQL runs in a worker thread on its own cursor (DuckDB releases the GIL), so a
    daemon's event loop keeps running; only `audit` talks to the network.
    """
    start, end = _utc(start), _utc(end)
    if end < start:
        raise ConfigError(f"end {end.isoformat()} is before start {start.isoformat()}")
    explicit = list(dict.fromkeys(explicit_dids))
    bad = [d for d in explicit if not is_did(d)]
    if bad:
        raise SyntaxError_(f"invalid DID(s): {', '.join(bad[:5])}")
    now = _utc(now or datetime.now(UTC))
    params = {"start": start, "end": end}
    timings: dict[str, float] = {}
    found: dict[str, list[str]] = {r.value: [] for r in Reason}
    loop = asyncio.get_running_loop()

    def sql_reasons() -> tuple[list[tuple[datetime, datetime]], list[tuple[str, str | None, str]]]:
        with store.read() as reader:
            for reason, sql in (
                (Reason.DESYNCHRONIZED, _DESYNC_SQL),
                (Reason.NEVER_BACKFILLED, _NEVER_SQL),
                (Reason.REFERENCED, _REFERENCED_SQL),
            ):
                t0 = loop.time()
                found[reason.value] = _column(reader, sql, params)
                timings[reason.value] = loop.time() - t0
            t0 = loop.time()
            found.update(network.network_gaps(reader, collections=collections))
            timings["network"] = loop.time() - t0
            t0 = loop.time()
            rows = reader.fetchall(
                "SELECT first_event_at, last_event_at, ended = ? FROM coverage", [CoverageEnd.RUNNING.value]
            )
            gaps = downtime_spans(rows, start=start, end=end, now=now, min_downtime=min_downtime)
            candidates: list[tuple[str, str | None, str]] = []
            if gaps:
                spans = pa.table(
                    {"gap_start": [a for a, _ in gaps], "gap_end": [b for _, b in gaps]},
                    schema=pa.schema([("gap_start", pa.timestamp("us", tz="UTC")),
                                      ("gap_end", pa.timestamp("us", tz="UTC"))]),
                )
                with reader.registered("_gaps", spans):
                    if audit is None:
                        found[Reason.DOWNTIME.value] = _column(reader, _DOWNTIME_NO_AUDIT_SQL, {
                            "margin": no_audit_margin, "low": min(a for a, _ in gaps) - no_audit_margin,
                            "high": max(b for _, b in gaps) + no_audit_margin})
                    else:
                        candidates = [(d, r, p) for d, r, p in reader.fetchall(_DOWNTIME_CANDIDATES_SQL)]
            timings[Reason.DOWNTIME.value] = loop.time() - t0
            return gaps, candidates

    try:
        gaps, candidates = await asyncio.to_thread(sql_reasons)
    except StorageError as exc:
        raise StorageError(f"gap detection failed: {exc}") from exc.__cause__
    if audit is not None and candidates:
        t0 = loop.time()
        by_host: dict[str, list[tuple[str, str | None]]] = {}
        for did, rev, pds in candidates:
            by_host.setdefault(pds, []).append((did, rev))
        wanted = {did for did, _, _ in candidates}
        moved = await audit(by_host)
        found[Reason.DOWNTIME.value] = sorted(moved & wanted)
        timings[Reason.DOWNTIME.value] += loop.time() - t0
    found[Reason.EXPLICIT.value] = explicit

    merged: dict[str, list[str]] = {}
    for reason, dids in found.items():
        for did in dids:
            merged.setdefault(did, []).append(reason)
    reasons_by_did = {
        did: tuple(sorted(set(reasons), key=_ORDER.__getitem__)) for did, reasons in merged.items()
    }
    return GapReport(
        start=start,
        end=end,
        reasons_by_did=reasons_by_did,
        counts={reason: len(set(dids)) for reason, dids in found.items()},
        downtime=tuple(gaps),
        audited=audit is not None,
        audit_candidates=len(candidates),
        timings=timings,
    )


class PdsAuditor:
    """An Auditor over the PDS sync endpoints: which held heads did their PDS move past?

    Per host: `listRepos` (paged, 1000 a page) when more than `per_did_threshold` DIDs are
    held there, else `getLatestCommit` per DID (paging a whole host to check three DIDs costs
    more). DIDs the listing lacks fall back to `getLatestCommit`. DIDs with no cached PDS are
    resolved first. Flagged: head rev > held rev, no held rev, an inactive listing (the account
    changed state while we were away), or any failure to find out (better one backfill too many
    than a silent hole; the backfill then records the precise outcome).
    """

    def __init__(
        self, client: PdsClient, resolver: Resolver, *, per_did_threshold: int = 20, concurrency: int = 16
    ) -> None:
        self.client = client
        self.resolver = resolver
        self.per_did_threshold = per_did_threshold
        self._sem = asyncio.Semaphore(concurrency)

    async def __call__(self, held: HeldRevs) -> set[str]:
        by_host: dict[str, list[tuple[str, str | None]]] = {h: list(v) for h, v in held.items() if h}
        moved: set[str] = set()
        unknown = list(held.get(UNKNOWN_HOST, ()))

        async def locate(did: str, rev: str | None) -> None:
            async with self._sem:
                try:
                    ident = await self.resolver.resolve(did)
                except (IdentityError, FetchError) as exc:
                    log.info("audit: cannot resolve", extra={"ctx": {"did": did, "error": str(exc)}})
                    moved.add(did)
                    return
            by_host.setdefault(ident.pds, []).append((did, rev))

        await asyncio.gather(*(locate(d, r) for d, r in unknown))
        await asyncio.gather(*(self._host(pds, rows, moved) for pds, rows in by_host.items()))
        return moved

    async def _host(self, pds: str, rows: list[tuple[str, str | None]], moved: set[str]) -> None:
        held = dict(rows)
        left = dict(held)
        if len(held) > self.per_did_threshold:
            try:
                async for repo in self.client.list_repos(pds):
                    if repo.did not in left:
                        continue
                    rev = left.pop(repo.did)
                    if not repo.active or rev is None or repo.rev > rev:
                        moved.add(repo.did)
                    if not left:
                        break
            except FetchError as exc:
                log.info("audit: listRepos failed, asking per DID", extra={"ctx": {"pds": pds, "error": str(exc)}})

        async def latest(did: str, rev: str | None) -> None:
            async with self._sem:
                try:
                    _, head = await self.client.get_latest_commit(pds, did)
                except FetchError as exc:
                    log.info("audit: getLatestCommit failed", extra={"ctx": {"did": did, "error": str(exc)}})
                    moved.add(did)
                    return
            if rev is None or head > rev:
                moved.add(did)

        await asyncio.gather(*(latest(d, r) for d, r in left.items()))
