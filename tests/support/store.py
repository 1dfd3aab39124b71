"""A Store that tests can write arbitrary rows into, to set up states the pipeline would take long to reach.

`Store` itself offers no raw-SQL write: everything skyfill writes goes through its named methods.
Tests that fabricate a state (a broken row, a queue entry due an hour ago) use `SetupStore`,
which is a `Store` in every other way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import duckdb

from skyfill.storage import Batch, RecordPut, Store

__all__ = ["SetupStore"]


class SetupStore(Store):
    def execute_write(self, sql: str, params: Iterable[Any] = ()) -> None:
        """One statement in its own transaction (a DuckDB failure leaves as StorageError)."""

        def body(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(sql, list(params))

        self._txn(body)

    def put_records(self, rows: Iterable[tuple[str, str, str, str, str | None, str | None, str | None]]) -> None:
        """Store (did, collection, rkey, cid, record JSON, createdAt ISO, event time ISO) rows, one
        batch, through the write path (records are versions appended to a log: no raw INSERT)."""
        batch = Batch()
        for did, collection, rkey, cid, record, created_at, event_at in rows:
            batch.put_record(did, collection, rkey, RecordPut(cid, None, record, created_at, event_at))
        self.apply(batch)

    def delete_records(self, where: str = "true", params: Iterable[Any] = ()) -> int:
        """Delete the live records matching `where` (SQL over the `records` view) as the firehose would."""
        keys = self.fetchall(f"SELECT did, collection, rkey FROM records WHERE {where}", params)
        batch = Batch()
        for did, collection, rkey in keys:
            batch.delete_record(did, collection, rkey)
        self.apply(batch)
        return len(keys)

    def compact_repos(self) -> int:
        """Fold every committed log row into the bases (records and repos), as the background
        compaction does. Returns the DIDs whose repo_base row was rewritten."""
        return self.compact().repos

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
