"""A Store that tests can write arbitrary rows into, to set up states the pipeline would take long to reach.

`Store` itself offers no raw-SQL write: everything skyfill writes goes through its named methods.
Tests that fabricate a state (a broken row, a queue entry due an hour ago) use `SetupStore`,
which is a `Store` in every other way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import duckdb

from skyfill.storage import Store, repos

__all__ = ["SetupStore"]


class SetupStore(Store):
    def execute_write(self, sql: str, params: Iterable[Any] = ()) -> None:
        """One statement in its own transaction (a DuckDB failure leaves as StorageError)."""

        def body(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(sql, list(params))

        self._txn(body)

    def read_cursor_for_tests(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB cursor of its own (a maintenance transaction beside the writers); close it."""
        return self._conn.cursor()

    def compact_repos(self) -> int:
        """Fold every committed repo_log row into repo_base, on a cursor of its own (as the
        compaction does: outside the write lock). Returns the DIDs rewritten."""
        cur = self.read_cursor_for_tests()
        try:
            cur.execute("BEGIN TRANSACTION")
            upto = repos.committed_version(cur)
            n = repos.compact(cur, upto) if upto is not None else 0
            cur.execute("COMMIT")
            return n
        finally:
            cur.close()

    def update_repos(self, assignments: str, where: str = "TRUE") -> None:
        """`UPDATE repos SET <assignments> WHERE <where>` on the v2 layout: fold the log into the
        base, then update the base rows (the view is not updatable)."""
        self.compact_repos()
        self.execute_write(f"UPDATE repo_base SET {assignments} WHERE {where}")

    def delete_repo(self, did: str) -> None:
        """Forget `did`'s repos row (base and log)."""

        def body(con: duckdb.DuckDBPyConnection) -> None:
            con.execute("DELETE FROM repo_base WHERE did = ?", [did])
            con.execute("DELETE FROM repo_log WHERE did = ?", [did])

        self._txn(body)

    def __enter__(self) -> SetupStore:
        return self
