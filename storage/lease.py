"""The compaction lease of a lake: one compactor in the whole lake, and writers hold their commits for it.

Why. DuckLake detects conflicts per table: a transaction that DELETEs from a table fails at COMMIT
when any other transaction committed an INSERT into that table since it began. Writers only append
(storage/lake.py `upsert`), so writers never conflict with each other; the compactor is the only one
that deletes, and under constant appends it would lose every time. So:

    compactor   takes the lease (a row in `skyfill.leases` of the catalog's PostgreSQL: holder +
                expires_at), waits `SETTLE` for commits already past their check, runs its one
                transaction, renews the lease every third of its term meanwhile, and releases it
    writer      checks the lease right before each COMMIT (`wait_free`, on a cursor of its own: inside
                a DuckDB transaction the Postgres reads see the transaction's first snapshot); while
                another holds it, the commit waits, at most until `expires_at`

Worked example, term 30 s: writer A checks (free) at t=0 and commits at t=0.02; the compactor takes the
lease at t=0.01, settles until t=0.11 and begins: A's commit is in its snapshot, no conflict. Writer B
checks at t=0.05: held, it waits; the compaction commits at t=2 and releases; B commits at t=2.01.
A compactor killed with -9 at t=1 never renews: the lease expires at t=30, and B commits then.
A commit that slipped past its check into the compaction's window makes the compaction conflict: it
is retried at once, and now every writer waits.

Times are PostgreSQL's `clock_timestamp()`, so the writers' clocks do not matter. Only a lake with a
PostgreSQL catalog has a lease; a DuckDB or SQLite catalog has one writer process (`StoreBase.leased`).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Final

import duckdb

from .lake import postgres_execute, postgres_query, quote

__all__ = ["Lease", "SETTLE", "lease_remaining", "wait_free"]

# after taking the lease, the compactor waits this long for commits already past their check
SETTLE: Final = 0.1
_POLL: Final = 0.05


def lease_remaining(cur: duckdb.DuckDBPyConnection, name: str, *, holder: str | None = None) -> float | None:
    """Seconds left of the lease `name` held by another than `holder`, or None when it is free.
    `cur` must not be inside a transaction (it would read that transaction's snapshot)."""
    rows = postgres_query(cur, f"SELECT holder, extract(epoch FROM expires_at - clock_timestamp())::float8 "
                               f"FROM skyfill.leases WHERE name = {quote(name)} AND expires_at > clock_timestamp()")
    if not rows or rows[0][0] == holder:
        return None
    return float(rows[0][1])


class Lease:
    """The lease `name` in the lake whose connection is `con`, for `seconds` at a time."""

    def __init__(self, con: duckdb.DuckDBPyConnection, name: str, *, seconds: float) -> None:
        self._con = con
        self.name = name
        self.seconds = seconds
        self.holder = f"{uuid.uuid4().hex}"
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()

    def try_acquire(self) -> bool:
        """Take the lease if it is free or expired (or already ours); True when we hold it."""
        cur = self._con.cursor()
        try:
            postgres_execute(cur, (
                f"INSERT INTO skyfill.leases AS l VALUES ({quote(self.name)}, {quote(self.holder)}, "
                f"clock_timestamp() + interval '{float(self.seconds)} seconds') ON CONFLICT (name) DO UPDATE "
                f"SET holder = excluded.holder, expires_at = excluded.expires_at "
                f"WHERE l.expires_at <= clock_timestamp() OR l.holder = excluded.holder"))
            rows = postgres_query(cur, f"SELECT holder FROM skyfill.leases WHERE name = {quote(self.name)}")
        finally:
            cur.close()
        return bool(rows) and rows[0][0] == self.holder

    def acquire(self, *, timeout: float | None = None) -> bool:
        """Take the lease, waiting for another holder to release it (or for its expiry);
        False when `timeout` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.try_acquire():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_POLL * 4)
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name=f"skyfill-lease-{self.name}", daemon=True)
        self._renewer.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.try_acquire()
            except duckdb.Error:
                pass  # the next renewal tries again; past the term writers go on, and the compaction may conflict

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        cur = self._con.cursor()
        try:
            postgres_execute(cur, f"DELETE FROM skyfill.leases WHERE name = {quote(self.name)} "
                                  f"AND holder = {quote(self.holder)}")
        finally:
            cur.close()


def wait_free(cur: duckdb.DuckDBPyConnection, name: str) -> float:
    """Wait while another holds the lease `name` (at most until its expiry); the seconds waited."""
    started = time.monotonic()
    while (left := lease_remaining(cur, name)) is not None:
        time.sleep(min(_POLL, max(left, 0.001)))
    return time.monotonic() - started
