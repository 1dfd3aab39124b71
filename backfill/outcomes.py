"""Recording a backfill's failed or deferred outcome (the rules: backfill/backfiller.py's docstring)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from skyfill import metrics
from skyfill.errors import SkyfillError
from skyfill.storage import BackfillStatus, RetryPolicy, Store

from .progress import Tally

__all__ = ["record_failure", "record_deferred"]

log = logging.getLogger("skyfill.backfill.backfiller")

# Every outcome's series exists from the start, at 0: increase() over a series born at 1 sees no
# increase, so the first failures would never reach the backfill-failure alert
# (deploy/prometheus/skyfill-rules.yml), and the dashboard would show nothing instead of 0.
for _status in (*BackfillStatus, "deferred"):
    metrics.BACKFILL_REPOS.labels(outcome=str(_status))


async def record_failure(
    store: Store, did: str, status: BackfillStatus, error: str, tally: Tally, policy: RetryPolicy,
    *, host: str | None = None,
) -> None:
    """The one line of a failed repo (warning): did, host (None before the DID resolved), status, error."""
    try:
        # counts the attempt; a `retrying` one past max_attempts comes back as Failed
        status, error = await asyncio.to_thread(
            store.record_backfill_failure, did, status=status, error=error, policy=policy
        )
    except SkyfillError:
        log.exception("could not record a backfill failure", extra={"ctx": {"did": did}})
    log.warning("backfill failed", extra={"ctx": {"did": did, "host": host, "status": status.value, "error": error}})
    tally.fail(status.value)
    metrics.BACKFILL_REPOS.labels(outcome=status.value).inc()


async def record_deferred(
    store: Store, did: str, retry_at: float, host: str | None, tally: Tally, *, queue_only: bool
) -> None:
    """The host stays parked past our patience: due again at the park's end.

    Rate limiting is the host's state, not the DID's: no attempt is counted. Queue mode
    writes only the queue row (the queue hands the DID out again once due); list mode has
    no queue to come back to, so the repo row says 'retrying' until the park's end.
    """
    retry_after = datetime.fromtimestamp(retry_at, UTC)
    error = f"rate limited: host {host} parked until {retry_after.isoformat(timespec='seconds')}"
    # list mode gives up on the DID (a warning); queue mode merely reschedules it (info:
    # a daemon round may defer thousands of DIDs of one parked host)
    log.log(
        logging.INFO if queue_only else logging.WARNING,
        "backfill deferred",
        extra={"ctx": {"did": did, "host": host, "retry_after": retry_after.isoformat(timespec="seconds"),
                       "mode": "queue" if queue_only else "list"}},
    )
    tally.fail("deferred")
    metrics.BACKFILL_REPOS.labels(outcome="deferred").inc()
    try:
        await asyncio.to_thread(store.defer_backfill, did, retry_after, error=None if queue_only else error)
    except SkyfillError:
        log.exception("could not record a deferred backfill", extra={"ctx": {"did": did}})
