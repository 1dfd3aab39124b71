"""`skyfill identities sync`: the PLC directory's export into the bulk identity table.

Pages of `{plc}/export?after=...` (net/plc.py) are appended with the `after` cursor past them in
one transaction (storage/plc.py), so a killed sync resumes after the last stored page and a page
is never applied twice; at the end (the export answered an empty page) the log is folded into the
sorted base. A line that is not a valid export entry is counted and skipped; an operation a resolve
would refuse (an unsafe PDS endpoint, an unusable key) is stored as an error, so the DID falls back
to a per-DID resolve, which records the precise outcome. A page that moves the cursor nowhere while
refusing lines stops the sync with an error (the export would loop).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from skyfill import metrics
from skyfill.errors import FetchError, InputError
from skyfill.net.plc import PlcExport
from skyfill.storage import Store

from .progress import Phase, Phases, report

__all__ = ["SyncSummary", "sync_identities"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SyncSummary:
    plc: str
    pages: int = 0
    operations: int = 0          # lines read (nullified included)
    stored: int = 0              # entries appended (newest per DID wins at the fold)
    refused: int = 0             # lines that were not valid export entries
    complete: bool = False       # the export was read to its end
    error: str | None = None     # why the sync stopped early
    folded_dids: int = 0         # DIDs in the bulk table after the fold (0: no fold this run)
    elapsed: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"plc": self.plc, "pages": self.pages, "operations": self.operations, "stored": self.stored,
                "refused": self.refused, "complete": self.complete, "error": self.error,
                "folded_dids": self.folded_dids, "elapsed": round(self.elapsed, 3)}


async def sync_identities(
    store: Store, export: PlcExport, *, max_pages: int | None = None, fold_every: int = 5_000_000,
    progress: bool = False,
) -> SyncSummary:
    """Read the export from the stored cursor to its end (or `max_pages` pages). Phases
    (progress.report: bars if `progress`, else a log line every 30 s): "operations" read, and
    "history_h", the hours of the directory's history read out of those up to now (the export is
    ordered by createdAt), which gives the ETA."""
    started = time.monotonic()
    plc = export.plc_url
    summary = SyncSummary(plc)
    after, _ = await asyncio.to_thread(store.plc_cursor, plc)
    phases = Phases("operations", "history_h")

    def extra() -> dict[str, Any]:
        return {"pages": summary.pages, "stored": summary.stored, "refused": summary.refused}

    origin: datetime | None = None
    async with report(phases, what="identities sync", terminal=progress, extra=extra):
        pending = 0
        while max_pages is None or summary.pages < max_pages:
            try:
                page = await export.page(after)
            except (FetchError, InputError) as exc:
                summary.error = str(exc)
                log.warning("PLC export stopped", extra={"ctx": {"plc": plc, "after": after, "error": str(exc)}})
                break
            if page.bad_lines:
                log.warning("PLC export: lines refused", extra={"ctx": {"plc": plc, "count": len(page.bad_lines),
                                                                        "first": page.bad_lines[:3]}})
            done = page.lines == 0 or (page.lines < export.count and not page.bad_lines)
            stuck = not done and (page.after is None or page.after == after)
            nxt = after if stuck or page.after is None else page.after
            await asyncio.to_thread(store.save_plc_page, plc, page.entries, after=nxt, lines=page.lines,
                                    skipped=len(page.bad_lines), done=done)
            summary.pages += 1
            summary.operations += page.lines
            summary.stored += len(page.entries)
            phases["operations"].advance(page.lines)
            origin = _history(phases["history_h"], nxt, origin)
            summary.refused += len(page.bad_lines)
            metrics.PLC_EXPORT_OPERATIONS.labels(result="stored").inc(len(page.entries))
            metrics.PLC_EXPORT_OPERATIONS.labels(result="skipped").inc(page.lines - len(page.entries))
            pending += len(page.entries)
            if done:
                summary.complete = True
                break
            if stuck:
                summary.error = f"the export does not move past {after!r}: {'; '.join(page.bad_lines[:3])}"
                log.warning("PLC export stuck", extra={"ctx": {"plc": plc, "after": after, "error": summary.error}})
                break
            after = nxt
            if pending >= fold_every:
                summary.folded_dids = (await asyncio.to_thread(store.fold_plc)).dids
                pending = 0
        if summary.complete or pending:
            result = await asyncio.to_thread(store.fold_plc)
            summary.folded_dids = result.dids or summary.folded_dids
    summary.elapsed = time.monotonic() - started
    log.info("identities sync", extra={"ctx": summary.to_json()})
    return summary


def _history(phase: Phase, cursor: str | None, origin: datetime | None) -> datetime | None:
    """`cursor` (a createdAt) as hours read since `origin` (the first page's, returned), out of
    the hours from `origin` up to now."""
    try:
        at = datetime.fromisoformat(cursor.replace("Z", "+00:00")) if cursor else None
    except ValueError:
        at = None
    if at is None:
        return origin
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    if origin is None:
        origin = at
        phase.advance(0)  # the phase begins (its rate counts from here)
    phase.done = max(0, int((at - origin).total_seconds() // 3600))
    phase.total = max(phase.done, int((datetime.now(UTC) - origin).total_seconds() // 3600))
    return origin
