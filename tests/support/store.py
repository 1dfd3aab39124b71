"""A Store that tests can write arbitrary rows into, to set up states the pipeline would take long to reach.

`Store` itself offers no raw-SQL write: everything skyfill writes goes through its named methods.
Tests that fabricate a state (a broken row, a queue entry due an hour ago) use `SetupStore`,
which is a `Store` in every other way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import duckdb

from skyfill.storage import Store

__all__ = ["SetupStore"]


class SetupStore(Store):
    def execute_write(self, sql: str, params: Iterable[Any] = ()) -> None:
        """One statement in its own transaction (a DuckDB failure leaves as StorageError)."""

        def body(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(sql, list(params))

        self._txn(body)

    def __enter__(self) -> SetupStore:
        return self
