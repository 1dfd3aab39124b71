"""Side tables that are not the mirror: the DID-document cache and the Kafka sink's dedup marks.

`identities` caches resolved DID documents for `skyfill.net.identity.Resolver` (Store is its
`IdentityCache`). `sink_tombstones` / `sink_snapshots` belong to `skyfill.publish.sink`:
created on the sink's first start, they hold the rev of each delete and snapshot it applied, so
replayed or older messages are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa

from skyfill.net.identity import IdentityRow

from .base import StoreBase
from .lake import replace_rows, run_ddl

__all__ = ["Caches"]

_UPSERT_IDENTITIES = (
    "INSERT INTO identities (did, pds, signing_key, handle, doc, resolved_at, error) "
    "VALUES {values} ON CONFLICT (did) DO UPDATE SET pds = excluded.pds, "
    "signing_key = excluded.signing_key, handle = excluded.handle, doc = excluded.doc, "
    "resolved_at = excluded.resolved_at, error = excluded.error"
)

_TOMBSTONES_DDL = (
    "CREATE TABLE IF NOT EXISTS sink_tombstones (did VARCHAR NOT NULL, collection VARCHAR NOT NULL, "
    "rkey VARCHAR NOT NULL, rev VARCHAR, PRIMARY KEY (did, collection, rkey))"
)
_SNAPSHOTS_DDL = "CREATE TABLE IF NOT EXISTS sink_snapshots (did VARCHAR PRIMARY KEY, rev VARCHAR NOT NULL)"
_TOMBS = pa.schema([("did", pa.string()), ("collection", pa.string()), ("rkey", pa.string()), ("rev", pa.string())])


class Caches(StoreBase):
    """Store methods writing the identity cache and the Kafka sink's marks."""

    def load_identity(self, did: str, *, max_age: float) -> IdentityRow | None:
        """The cached, usable document of `did` resolved less than `max_age` seconds ago."""
        since = datetime.now(UTC) - timedelta(seconds=max_age)
        rows = self.fetchall(
            "SELECT pds, signing_key, handle, doc::VARCHAR, epoch(resolved_at) FROM identities "
            "WHERE did = ? AND error IS NULL AND resolved_at > ?", [did, since])
        if not rows:
            return None
        pds, key, handle, doc, resolved_at = rows[0]
        return IdentityRow(did, pds, key, handle, doc, float(resolved_at))

    def fresh_signing_keys(self, *, max_age: float, limit: int) -> dict[str, str]:
        """Signing keys of the `limit` most recently resolved DIDs (to seed a verifier)."""
        since = datetime.now(UTC) - timedelta(seconds=max_age)
        rows = self.fetchall(
            "SELECT did, signing_key FROM identities WHERE error IS NULL AND signing_key IS NOT NULL "
            "AND resolved_at > ? ORDER BY resolved_at DESC LIMIT ?", [since, limit])
        return {did: key for did, key in rows}

    def save_identities(self, rows: Sequence[IdentityRow]) -> None:
        """Upsert resolved (or failed) DID documents, all in one transaction."""
        if not rows:
            return
        params: list[Any] = []
        for r in rows:
            params += [r.did, r.pds, r.signing_key, r.handle, r.doc, datetime.fromtimestamp(r.resolved_at, UTC), r.error]
        values = ", ".join(["(?, ?, ?, ?, ?::JSON, ?, ?)"] * len(rows))
        if not self.lake:
            self._txn(lambda con: con.execute(_UPSERT_IDENTITIES.format(values=values), params))
            return
        # the lake has no primary key: the newest row of a DID replaces it (storage/lake.py)
        newest = {r.did: i for i, r in enumerate(rows)}
        params = [p for i in sorted(newest.values()) for p in params[7 * i: 7 * i + 7]]
        values = ", ".join(["(?, ?, ?, ?, ?::JSON, ?, ?)"] * len(newest))

        def body(con: duckdb.DuckDBPyConnection) -> None:
            con.execute("CREATE OR REPLACE TEMP TABLE _identities AS SELECT * FROM (VALUES " + values +
                        ") t(did, pds, signing_key, handle, doc, resolved_at, error)", params)
            try:
                replace_rows(con, "identities", ("did",), "_identities")
            finally:
                con.execute("DROP TABLE IF EXISTS _identities")

        self._txn(body)

    def create_sink_tables(self) -> None:
        """The Kafka sink's own tables, if missing."""

        def body(con: duckdb.DuckDBPyConnection) -> None:
            run_ddl(con, _TOMBSTONES_DDL)
            run_ddl(con, _SNAPSHOTS_DDL)

        self._txn(body)

    def write_sink_marks(
        self, tombstones: Mapping[tuple[str, str, str], str | None], snapshots: Mapping[str, str]
    ) -> None:
        """Record the rev of each delete ((did, collection, rkey) -> rev) and each repo snapshot
        (did -> rev) the sink applies; a snapshot mark only ever moves forward."""
        tables: list[tuple[str, str, pa.Table]] = []
        if tombstones:
            keys = list(tombstones)
            tables.append((
                "INSERT INTO sink_tombstones SELECT * FROM _t ON CONFLICT (did, collection, rkey) "
                "DO UPDATE SET rev = excluded.rev",
                "_t",
                pa.table({"did": [k[0] for k in keys], "collection": [k[1] for k in keys],
                          "rkey": [k[2] for k in keys], "rev": [tombstones[k] for k in keys]}, schema=_TOMBS),
            ))
        if snapshots:
            snaps = list(snapshots.items())
            tables.append((
                "INSERT INTO sink_snapshots SELECT * FROM _s ON CONFLICT (did) "
                "DO UPDATE SET rev = greatest(sink_snapshots.rev, excluded.rev)",
                "_s",
                pa.table({"did": [d for d, _ in snaps], "rev": [r for _, r in snaps]}),
            ))
        if not tables:
            return

        def body(con: duckdb.DuckDBPyConnection) -> None:
            for sql, name, table in tables:
                con.register(name, table)
                try:
                    if not self.lake:
                        con.execute(sql)
                    elif name == "_t":  # the lake: DELETE + INSERT, no primary key (storage/lake.py)
                        replace_rows(con, "sink_tombstones", ("did", "collection", "rkey"), "_t")
                    else:
                        replace_rows(con, "sink_snapshots", ("did",), "(SELECT s.did, greatest(s.rev, "
                                     "coalesce(o.rev, s.rev)) AS rev FROM _s s LEFT JOIN sink_snapshots o USING (did))")
                finally:
                    con.unregister(name)

        self._txn(body)
