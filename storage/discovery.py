"""What discovery stores: listed repos (append-only), enumeration cursors, backfill filters.

`listed_repos` grows to one row per repo of the network per enumeration run (40M+), so it is a
log: rows are appended with a `listing_seq` number and a DID's newest listing is the one with the
highest `n` (storage/network_gaps.py reads it that way). `enum_cursors` is small (one row per host
and endpoint), so it keeps a primary key; each page's rows and the cursor past them are written in
ONE transaction: a run killed between two pages resumes at the first page not stored, and a page
is never stored twice by the same run.

A run: `begin_enumeration` starts a fresh one when the previous finished (every cursor done) or
when asked to restart, else the unfinished one goes on from its stored cursors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import duckdb
import pyarrow as pa

from .base import StoreBase, now_utc
from .lake import next_value

__all__ = ["Discovery", "EnumCursor", "ListedRow", "canonical_filter", "advance_cursor", "ALL_COLLECTIONS"]

_CURSOR_COLUMNS: Final = "host, endpoint, cursor, done, pages, items, skipped, error"

_LISTED = pa.schema([
    ("did", pa.string()), ("head", pa.string()), ("rev", pa.string()), ("active", pa.bool_()),
    ("status", pa.string()),
])


@dataclass(frozen=True, slots=True)
class EnumCursor:
    host: str
    endpoint: str
    cursor: str | None
    done: bool
    pages: int
    items: int
    skipped: int
    error: str | None


@dataclass(frozen=True, slots=True)
class ListedRow:
    did: str
    head: str | None
    rev: str | None
    active: bool | None
    status: str | None


ALL_COLLECTIONS: Final = "*"


def canonical_filter(patterns: Iterable[str] | None) -> str:
    """A collections filter as stored: sorted distinct patterns joined by ','; "*" = everything."""
    items = sorted({p for p in (patterns or ()) if p})
    return ALL_COLLECTIONS if not items or ALL_COLLECTIONS in items else ",".join(items)


# enum_cursors has one row per (host, endpoint): an UPDATE, then this inserts the row when missing
# (no ON CONFLICT: the same statements on a DuckDB file and on a lake, which has no primary keys)
_INSERT_MISSING = ("INSERT INTO enum_cursors ({columns}) SELECT {values} "
                   "WHERE NOT EXISTS (SELECT 1 FROM enum_cursors WHERE host = ? AND endpoint = ?)")


class Discovery(StoreBase):
    """Store methods of discovery (skyfill.backfill.discover) and of the backfill filter record."""

    def enum_cursors(self, *, endpoints: Sequence[str] | None = None) -> list[EnumCursor]:
        sql = f"SELECT {_CURSOR_COLUMNS} FROM enum_cursors"
        params: list[Any] = []
        if endpoints is not None:
            sql += f" WHERE endpoint IN ({', '.join('?' for _ in endpoints)})"
            params = list(endpoints)
        return [EnumCursor(*row) for row in self.fetchall(sql + " ORDER BY host, endpoint", params)]

    def begin_enumeration(self, endpoints: Sequence[str], *, restart: bool = False) -> bool:
        """Forget the cursors of `endpoints` when their run finished (or `restart`), so a new run
        lists everything again. Returns True when a fresh run starts."""
        marks = ", ".join("?" for _ in endpoints)

        def body(con: duckdb.DuckDBPyConnection) -> bool:
            rows = con.execute(f"SELECT count(*), count(*) FILTER (WHERE NOT done) FROM enum_cursors "
                               f"WHERE endpoint IN ({marks})", list(endpoints)).fetchall()
            total, open_ = rows[0]
            if total and open_ and not restart:
                return False
            con.execute(f"DELETE FROM enum_cursors WHERE endpoint IN ({marks})", list(endpoints))
            return True

        return bool(self._txn(body))

    def add_enumerations(
        self, rows: Sequence[tuple[str, str]], *, parent: tuple[str, str], cursor: str | None, skipped: int
    ) -> None:
        """Register (host, endpoint) enumerations found on one page of `parent` (listHosts), and
        move the parent's cursor past that page, in one transaction."""
        now = now_utc()

        def body(con: duckdb.DuckDBPyConnection) -> None:
            for host, endpoint in rows:
                con.execute(_INSERT_MISSING.format(columns="host, endpoint, updated_at", values="?, ?, ?"),
                            [host, endpoint, now, host, endpoint])
            advance_cursor(con, parent, cursor, len(rows), skipped, now)

        self._txn(body)

    def save_listing(
        self, host: str, endpoint: str, rows: Sequence[ListedRow], *, cursor: str | None, skipped: int
    ) -> None:
        """Append one page's repos and move (host, endpoint)'s cursor past it, in one transaction.
        `cursor` None: that was the last page (the enumeration is done)."""
        now = now_utc()
        table = pa.table({
            "did": [r.did for r in rows], "head": [r.head for r in rows], "rev": [r.rev for r in rows],
            "active": [r.active for r in rows], "status": [r.status for r in rows],
        }, schema=_LISTED)

        def body(con: duckdb.DuckDBPyConnection) -> None:
            if rows:
                # the listing numbers are taken first (a lake has no sequences: storage/lake.py)
                page = table.append_column("n", pa.array(next_value(con, "listing_seq", len(rows)), pa.int64()))
                con.register("_listed_page", page)
                try:
                    con.execute(
                        "INSERT INTO listed_repos SELECT n, did, ?, ?, head, rev, active, status, ? "
                        "FROM _listed_page", [host, endpoint, now])
                finally:
                    con.unregister("_listed_page")
            advance_cursor(con, (host, endpoint), cursor, len(rows), skipped, now)

        self._txn(body)

    def enumeration_failed(self, host: str, endpoint: str, error: str) -> None:
        """Record why (host, endpoint) stopped; its cursor stays where the last stored page left it."""
        now = now_utc()

        def body(con: duckdb.DuckDBPyConnection) -> None:
            con.execute("UPDATE enum_cursors SET error = ?, updated_at = ? WHERE host = ? AND endpoint = ?",
                        [error[:500], now, host, endpoint])
            con.execute(_INSERT_MISSING.format(columns="host, endpoint, error, updated_at", values="?, ?, ?, ?"),
                        [host, endpoint, error[:500], now, host, endpoint])

        self._txn(body)

    def has_backfill_filters(self) -> bool:
        """Whether any backfill ever recorded a filter (none: every DID was backfilled whole)."""
        return bool(self.fetchall("SELECT EXISTS (SELECT 1 FROM backfill_filters)")[0][0])

    def record_backfill_filter(self, dids: Sequence[str], filter_: str) -> None:
        """The collections filter (canonical_filter) the last backfill of each of `dids` used."""
        if not dids:
            return
        now = now_utc()
        table = pa.table({"did": list(dids)})

        def body(con: duckdb.DuckDBPyConnection) -> None:
            con.register("_filter_dids", table)
            try:
                con.execute("INSERT INTO backfill_filters SELECT did, ?, ? FROM _filter_dids", [filter_, now])
            finally:
                con.unregister("_filter_dids")

        self._txn(body)


def advance_cursor(
    con: duckdb.DuckDBPyConnection, key: tuple[str, str], cursor: str | None, items: int, skipped: int, now: Any,
    *, done: bool | None = None,
) -> None:
    """Move (host, endpoint)'s cursor past a page of `items` rows (inside the page's transaction).
    `done` defaults to "no next cursor"."""
    host, endpoint = key
    finished = cursor is None if done is None else done
    con.execute(
        "UPDATE enum_cursors SET cursor = ?, done = ?, pages = pages + 1, items = items + ?, skipped = skipped + ?, "
        "error = NULL, updated_at = ? WHERE host = ? AND endpoint = ?",
        [cursor, finished, items, skipped, now, host, endpoint])
    con.execute(
        _INSERT_MISSING.format(columns="host, endpoint, cursor, done, pages, items, skipped, error, updated_at",
                               values="?, ?, ?, ?, 1, ?, ?, NULL, ?"),
        [host, endpoint, cursor, finished, items, skipped, now, host, endpoint])
