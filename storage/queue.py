"""The backfill queue's whole state machine: every transition of a DID's backfill, named.

Two rows hold a DID's backfill state, both written only here:

`backfill_queue.state` (QueueState) - what the queue will hand out:
    (no row) | done | failed --enqueue--------------> pending    (reasons start afresh)
    pending | in_progress    --enqueue--------------> unchanged  (gains the new reasons)
    pending (due)            --claim_backfills------> in_progress
    in_progress              --recover_queue--------> pending    (a process died holding it)
    any                      --mark_backfilled------> done       (the reconcile committed)
    any                      --record_backfill_failure, retrying --> pending (retry_after)
    any                      --record_backfill_failure, terminal --> failed
    any                      --defer_backfill-------> pending    (retry_after = the host's park end)

`repos.backfill_status` (BackfillStatus) - the outcome of the last attempt: `ok` (with
backfilled_at/rev), `retrying` (with backfill_retry_after) or a terminal status
(TERMINAL_BACKFILL). `repos.backfill_attempts` is THE retry counter: each failed attempt adds
one, a committed reconcile resets it, a deferral (the host's rate limit, not the DID's fault)
leaves it alone. `RetryPolicy` turns it into "retry at" or "give up" (status Failed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import duckdb
import pyarrow as pa

from skyfill.backoff import backoff_delay

from . import repos
from .base import StoreBase, now_utc
from .queries import DESYNCHRONIZED
from .states import BackfillStatus, QueueState

__all__ = ["BackfillQueue", "RetryPolicy", "mark_backfilled", "UNQUEUED_DESYNCHRONIZED_SQL"]

_PENDING: Final = QueueState.PENDING.value
_IN_PROGRESS: Final = QueueState.IN_PROGRESS.value
# states whose DID is still waiting for (or undergoing) a backfill
_OPEN: Final = f"('{_PENDING}', '{_IN_PROGRESS}')"

# what the daemon's repair loop queues: active desynchronized DIDs not already queued
UNQUEUED_DESYNCHRONIZED_SQL: Final = (
    f"SELECT did FROM repos WHERE {DESYNCHRONIZED} AND active AND did NOT IN "
    f"(SELECT did FROM backfill_queue WHERE state IN {_OPEN})"
)

# stored errors are cut to this many characters
_MAX_ERROR = 2000


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How transient failures are retried: at most `max_attempts` attempts in all, each retry
    after a jittered backoff (attempt 1 -> about `backoff_min`, doubling up to `backoff_max`)."""

    max_attempts: int
    backoff_min: timedelta
    backoff_max: timedelta

    def delay(self, attempts: int) -> timedelta:
        """How long to wait after `attempts` failed attempts (50-100 % of the full backoff)."""
        seconds = backoff_delay(attempts - 1, base=self.backoff_min.total_seconds(),
                                cap=self.backoff_max.total_seconds())
        return timedelta(seconds=seconds)


def mark_backfilled(con: duckdb.DuckDBPyConnection, v: int, did: str, rev: str | None, now: datetime) -> None:
    """ok/done: the reconcile of `did` commits in this transaction (write version `v`; its repo row exists)."""
    group = {"backfill_status": BackfillStatus.OK.value, "backfill_error": None, "backfill_attempts": 0,
             "backfill_retry_after": None, "backfilled_at": now, "backfilled_rev": rev}
    repos.append_backfill(con, v, did, group, first_seen_at=now)
    con.execute(
        "UPDATE backfill_queue SET state = ?, error = NULL, updated_at = ? WHERE did = ?",
        [QueueState.DONE.value, now, did],
    )


def _backfill_group(con: duckdb.DuckDBPyConnection, did: str) -> dict[str, Any]:
    """The current backfill group of `did` (the defaults when it has no row), read in this transaction."""
    rows = repos.current_rows(con, [did], repos.BACKFILL_FIELDS)
    if not rows:
        return {c: None for c in repos.BACKFILL_FIELDS} | {"backfill_attempts": 0}
    return dict(zip(repos.BACKFILL_FIELDS, rows[0][1:], strict=True))


class BackfillQueue(StoreBase):
    """Store methods for the backfill queue and the backfill outcome of repo rows."""

    def enqueue(self, reasons_by_did: Mapping[str, Iterable[str]]) -> int:
        """Add DIDs to the backfill queue; a DID already pending gains the new reasons. Returns new rows."""
        if not reasons_by_did:
            return 0
        now = now_utc()
        table = pa.table(
            {
                "did": list(reasons_by_did),
                "reasons": [sorted(set(r)) for r in reasons_by_did.values()],
            },
            schema=pa.schema([("did", pa.string()), ("reasons", pa.list_(pa.string()))]),
        )
        count_open = f"SELECT count(*) FROM backfill_queue WHERE state IN {_OPEN}"

        def body(con: duckdb.DuckDBPyConnection) -> int:
            con.register("_q", table)
            before = con.execute(count_open).fetchall()[0][0]
            con.execute(
                "INSERT INTO backfill_queue (did, reasons, enqueued_at, state, updated_at) "
                "SELECT did, reasons, ?, ?, ? FROM _q ON CONFLICT (did) DO UPDATE SET "
                "reasons = list_sort(list_distinct(list_concat("
                f"  CASE WHEN backfill_queue.state IN {_OPEN} THEN backfill_queue.reasons ELSE [] END,"
                "  excluded.reasons))), "
                f"state = CASE WHEN backfill_queue.state = '{_IN_PROGRESS}' THEN '{_IN_PROGRESS}' ELSE '{_PENDING}' END, "
                f"enqueued_at = CASE WHEN backfill_queue.state IN {_OPEN} "
                "  THEN backfill_queue.enqueued_at ELSE excluded.enqueued_at END, "
                "updated_at = excluded.updated_at",
                [now, _PENDING, now],
            )
            con.unregister("_q")
            after = con.execute(count_open).fetchall()[0][0]
            return int(after - before)

        return int(self._txn(body))

    def claim_backfills(self, limit: int) -> list[str]:
        """pending -> in_progress for up to `limit` DIDs whose retry_after has passed, oldest first."""
        now = now_utc()

        def body(con: duckdb.DuckDBPyConnection) -> list[str]:
            rows = con.execute(
                "UPDATE backfill_queue SET state = ?, updated_at = ? WHERE did IN ("
                "  SELECT did FROM backfill_queue WHERE state = ? AND (retry_after IS NULL OR retry_after <= ?)"
                "  ORDER BY enqueued_at, did LIMIT ?) RETURNING did",
                [_IN_PROGRESS, now, _PENDING, now, limit],
            ).fetchall()
            return [r[0] for r in rows]

        return list(self._txn(body))

    def recover_queue(self) -> int:
        """in_progress -> pending for rows a process that died left claimed (call at start-up)."""

        def body(con: duckdb.DuckDBPyConnection) -> int:
            rows = con.execute(
                "UPDATE backfill_queue SET state = ?, updated_at = ? WHERE state = ? RETURNING did",
                [_PENDING, now_utc(), _IN_PROGRESS],
            ).fetchall()
            return len(rows)

        return int(self._txn(body))

    def backfill_attempts(self, did: str) -> int:
        """Failed attempts counted for `did` since its last successful backfill."""
        rows = self.fetchall("SELECT backfill_attempts FROM repos WHERE did = ?", [did])
        return int(rows[0][0]) if rows else 0

    def record_backfill_failure(
        self, did: str, *, status: BackfillStatus, error: str, policy: RetryPolicy
    ) -> tuple[BackfillStatus, str]:
        """Count one failed attempt of `did` and record its outcome; never marks it done.

        A `retrying` status is retried after the policy's backoff, or becomes Failed (terminal)
        once this attempt reaches `policy.max_attempts`. Returns the status and error recorded
        (the error is stored cut to 2000 characters)."""
        now = now_utc()

        def body(con: duckdb.DuckDBPyConnection) -> tuple[BackfillStatus, str]:
            group = _backfill_group(con, did)
            attempts = int(group["backfill_attempts"] or 0) + 1
            final, message, retry_after = status, error, None
            if status is BackfillStatus.RETRYING:
                if attempts >= policy.max_attempts:
                    final, message = BackfillStatus.FAILED, f"gave up after {attempts} attempts: {error}"
                else:
                    retry_after = now + policy.delay(attempts)
            stored = message[:_MAX_ERROR]
            group.update(backfill_status=final.value, backfill_error=stored, backfill_attempts=attempts,
                         backfill_retry_after=retry_after)
            repos.append_backfill(con, self._version(con), did, group, first_seen_at=now)
            con.execute(
                "UPDATE backfill_queue SET state = ?, retry_after = ?, error = ?, updated_at = ? WHERE did = ?",
                [_PENDING if retry_after is not None else QueueState.FAILED.value, retry_after, stored, now, did],
            )
            return final, message

        result: tuple[BackfillStatus, str] = self._txn(body)
        return result

    def defer_backfill(self, did: str, retry_after: datetime, *, error: str | None = None) -> None:
        """pending again at `retry_after` (the host's rate-limit park ends), no attempt counted.

        With `error` (a run with no queue to come back to) the repo row also says `retrying`
        until then."""
        now = now_utc()

        def body(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(
                "UPDATE backfill_queue SET state = ?, retry_after = ?, updated_at = ? WHERE did = ?",
                [_PENDING, retry_after, now, did],
            )
            if error is not None:
                group = _backfill_group(con, did)
                group.update(backfill_status=BackfillStatus.RETRYING.value, backfill_error=error,
                             backfill_retry_after=retry_after)
                repos.append_backfill(con, self._version(con), did, group, first_seen_at=now)

        self._txn(body)

    def unqueued_desynchronized(self) -> list[str]:
        """Active DIDs with a broken chain that are not pending or in progress in the backfill queue."""
        return [did for (did,) in self.fetchall(UNQUEUED_DESYNCHRONIZED_SQL)]
