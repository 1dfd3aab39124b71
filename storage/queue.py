"""The backfill queue's whole state machine: every transition of a DID's backfill, named.

Two rows hold a DID's backfill state, both written only here:

`backfill_queue.state` (QueueState) - what the queue will hand out:
    (no row) | done | failed --enqueue--------------> pending    (reasons start afresh)
    pending | in_progress    --enqueue--------------> unchanged  (gains the new reasons)
    pending (due)            --claim_backfills------> in_progress
    in_progress              --recover_queue--------> pending    (a process died holding it)
    any queued               --mark_backfilled------> done       (the reconcile committed)
    any                      --record_backfill_failure, retrying --> pending (retry_after)
    any                      --record_backfill_failure, terminal --> failed
    any                      --defer_backfill-------> pending    (retry_after = the host's park end)
Each transition APPENDS the DID's whole row to queue_log (storage/queue_log.py: no primary key,
no UPDATE, newest row per DID wins, compaction folds it like repo_log), so its cost does not grow
with the queue. Claims come from memory: `claim_backfills` pops DIDs from a chunk of due
pending rows read in one scan that stops at `_CLAIM_CHUNK` rows (hosts interleaved, so a chunk
feeds many hosts at once) and appends their in_progress rows; the next chunk is read when this
one is used up, and no longer holds them. A DID whose row another process changed after its
chunk was read may be handed out once more: a refetch, never a loss.

`repos.backfill_status` (BackfillStatus) - the outcome of the last attempt: `ok` (with
backfilled_at/rev), `retrying` (with backfill_retry_after) or a terminal status
(TERMINAL_BACKFILL). `repos.backfill_attempts` is THE retry counter: each failed attempt adds
one, a committed reconcile resets it, a deferral (the host's rate limit, not the DID's fault)
leaves it alone. `RetryPolicy` turns it into "retry at" or "give up" (status Failed).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import duckdb
import pyarrow as pa

from skyfill.backoff import backoff_delay

from . import queue_log, repos
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


def mark_backfilled(con: duckdb.DuckDBPyConnection, v: int, did: str, rev: str | None, now: datetime,
                    run: str | None = None) -> None:
    """ok/done: the reconcile of `did` commits in this transaction (write version `v`; its repo row
    exists). The repo row records when (`backfilled_at`) and in which backfill `run`."""
    group = {"backfill_status": BackfillStatus.OK.value, "backfill_error": None, "backfill_attempts": 0,
             "backfill_retry_after": None, "backfilled_at": now, "backfilled_rev": rev, "backfill_run": run}
    repos.append_backfills(con, v, [{"did": did, "first_seen_at": now, **group}])
    _transition(con, v, did, now, state=QueueState.DONE.value, error=None)


def _transition(con: duckdb.DuckDBPyConnection, v: int, did: str, now: datetime,
                row: dict[str, Any] | None = None, **changes: Any) -> None:
    """Append `did`'s queue row (`row`: its current one when the caller holds it) with `changes`
    (nothing when the DID was never queued)."""
    row = row or queue_log.current(con, [did]).get(did)
    if row is not None:
        queue_log.append(con, v, [row | changes | {"updated_at": now}])


def _backfill_group(con: duckdb.DuckDBPyConnection, did: str) -> dict[str, Any]:
    """The current backfill group of `did` (the defaults when it has no row), read in this transaction."""
    rows = repos.current_rows(con, [did], repos.BACKFILL_FIELDS)
    if not rows:
        return {c: None for c in repos.BACKFILL_FIELDS} | {"backfill_attempts": 0}
    return dict(zip(repos.BACKFILL_FIELDS, rows[0][1:], strict=True))


# due pending DIDs read into memory at a time by `claim_backfills` (a scan that stops there)
_CLAIM_CHUNK = 20_000


class BackfillQueue(StoreBase):
    """Store methods for the backfill queue and the backfill outcome of repo rows."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the chunk claims pop from: whole rows of due pending DIDs, hosts interleaved
        self._claimable: deque[dict[str, Any]] = deque()
        self._requeued: set[str] = set()  # enqueued since the chunk was read: its copy is stale
        # rows this store claimed, until their outcome is recorded (at most the DIDs in flight)
        self._claimed: dict[str, dict[str, Any]] = {}

    def enqueue(self, reasons_by_did: Mapping[str, Iterable[str]]) -> int:
        """Add DIDs to the backfill queue; a DID already pending gains the new reasons. Returns new rows.

        The DID's PDS host is stored with it when the identity cache knows it."""
        if not reasons_by_did:
            return 0
        now = now_utc()
        wanted = {did: set(r) for did, r in reasons_by_did.items()}

        def body(con: duckdb.DuckDBPyConnection) -> int:
            dids = list(wanted)
            rows = queue_log.current(con, dids)
            hosts = _hosts(con, dids)
            out, new = [], 0
            for did, reasons in wanted.items():
                row = rows.get(did)
                if row is not None and row["state"] in (_PENDING, _IN_PROGRESS):
                    merged = sorted(set(row["reasons"]) | reasons)
                    if merged == list(row["reasons"]) and row["host"] == (hosts.get(did) or row["host"]):
                        continue
                    out.append(row | {"reasons": merged, "updated_at": now, "host": hosts.get(did) or row["host"]})
                    continue
                new += 1
                out.append({"did": did, "reasons": sorted(reasons), "enqueued_at": now, "state": _PENDING,
                            "retry_after": None, "error": None, "updated_at": now, "host": hosts.get(did)})
            queue_log.append(con, self._version(con), out)
            self._requeued.update(r["did"] for r in out)
            return new

        return int(self._txn(body))

    def claim_backfills(self, limit: int) -> list[str]:
        """pending -> in_progress for up to `limit` due DIDs, hosts interleaved, from memory."""
        return [did for did, _ in self.claim_backfills_with_hosts(limit)]

    def claim_backfills_with_hosts(self, limit: int) -> list[tuple[str, str | None]]:
        """`claim_backfills`, each DID with the PDS endpoint stored at enqueue (None: unknown)."""
        now = now_utc()

        def body(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
            taken: list[dict[str, Any]] = []
            seen: set[str] = set()  # a chunk read in this call still shows what it took as pending
            fresh = False
            while len(taken) < limit:
                if not self._claimable:
                    if fresh:
                        break  # this call read the table already: nothing more is due
                    self._requeued.clear()
                    self._claimable.extend(queue_log.load_pending(con, now, _CLAIM_CHUNK))
                    fresh = True
                    continue
                row = self._claimable.popleft()
                if row["did"] not in self._requeued and row["did"] not in seen:
                    seen.add(row["did"])
                    taken.append(row | {"state": _IN_PROGRESS, "updated_at": now})
            queue_log.append(con, self._version(con), taken)
            if len(self._claimed) > 4 * _CLAIM_CHUNK:
                self._claimed.clear()  # done ones are never popped here; the log read is the fallback
            self._claimed.update((r["did"], r) for r in taken)
            return taken

        claimed: list[dict[str, Any]] = self._txn(body)
        self._note_appended(len(claimed))
        return [(r["did"], r["host"]) for r in claimed]

    def due_count(self) -> int:
        """Pending DIDs due now (one pass over the queue: for a progress total, not per claim)."""
        rows = self.fetchall("SELECT count(*) FROM backfill_queue WHERE state = ? AND "
                             "(retry_after IS NULL OR retry_after <= ?)", [_PENDING, now_utc()])
        return int(rows[0][0])

    def recover_queue(self) -> int:
        """in_progress -> pending for rows a process that died left claimed (call at start-up)."""
        now = now_utc()

        def body(con: duckdb.DuckDBPyConnection) -> int:
            rows = queue_log.in_state(con, _IN_PROGRESS)
            return queue_log.append(con, self._version(con), [r | {"state": _PENDING, "updated_at": now} for r in rows])

        recovered = int(self._txn(body))
        self._claimed.clear()
        # what was claimable before is read again: recovered rows are due at once
        self._claimable.clear()
        return recovered
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
            repos.append_backfills(con, self._version(con), [{"did": did, "first_seen_at": now, **group}])
            _transition(con, self._version(con), did, now, self._claimed.pop(did, None),
                        retry_after=retry_after, error=stored,
                        state=_PENDING if retry_after is not None else QueueState.FAILED.value)
            return final, message

        result: tuple[BackfillStatus, str] = self._txn(body)
        self._note_appended(2)
        return result

    def record_backfills(self, done: Mapping[str, tuple[str | None, datetime, str | None]]) -> None:
        """Backfills another process completed, did -> (rev, when, run): what `skyfill sink` reads from
        the repo messages `kind: backfill` (a worker's snapshot). Each repo row records ok as the local
        reconcile's `mark_backfilled` does, and a queued DID is done; one transaction."""
        if not done:
            return

        def body(con: duckdb.DuckDBPyConnection) -> None:
            v = self._version(con)
            repos.append_backfills(con, v, [
                {"did": did, "first_seen_at": at, "backfill_status": BackfillStatus.OK.value, "backfill_error": None,
                 "backfill_attempts": 0, "backfill_retry_after": None, "backfilled_at": at, "backfilled_rev": rev,
                 "backfill_run": run}
                for did, (rev, at, run) in done.items()])
            queued = queue_log.current(con, list(done))
            queue_log.append(con, v, [row | {"state": QueueState.DONE.value, "error": None, "updated_at": done[did][1]}
                                      for did, row in queued.items()])

        self._txn(body)
        self._note_appended(2 * len(done))

    def defer_backfill(self, did: str, retry_after: datetime, *, error: str | None = None) -> None:
        """pending again at `retry_after` (the host's rate-limit park ends), no attempt counted.

        With `error` (a run with no queue to come back to) the repo row also says `retrying`
        until then."""
        now = now_utc()

        def body(con: duckdb.DuckDBPyConnection) -> None:
            _transition(con, self._version(con), did, now, self._claimed.pop(did, None),
                        state=_PENDING, retry_after=retry_after)
            if error is not None:
                group = _backfill_group(con, did)
                group.update(backfill_status=BackfillStatus.RETRYING.value, backfill_error=error,
                             backfill_retry_after=retry_after)
                repos.append_backfills(con, self._version(con), [{"did": did, "first_seen_at": now, **group}])

        self._txn(body)
        self._note_appended(2)

    def unqueued_desynchronized(self) -> list[str]:
        """Active DIDs with a broken chain that are not pending or in progress in the backfill queue."""
        return [did for (did,) in self.fetchall(UNQUEUED_DESYNCHRONIZED_SQL)]


def _hosts(con: duckdb.DuckDBPyConnection, dids: list[str]) -> dict[str, str]:
    """The PDS endpoint the identity cache holds for each of `dids` that has one."""
    con.register("_queue_hosts", pa.table({"did": dids}))
    try:
        rows = con.execute("SELECT did, pds FROM (SELECT did, pds FROM identities WHERE did IN (SELECT did FROM "
                           "_queue_hosts) QUALIFY row_number() OVER (PARTITION BY did ORDER BY resolved_at DESC) = 1) "
                           "WHERE pds IS NOT NULL").fetchall()  # a DID's newest row (a lake appends: caches.py)
    finally:
        con.unregister("_queue_hosts")
    return {did: pds for did, pds in rows}
