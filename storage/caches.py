"""Side tables that are not the mirror: the DID-document cache and the Kafka sink's dedup marks.

`identities` caches resolved DID documents for `skyfill.net.identity.Resolver` (Store is its
`IdentityCache`). `sink_tombstones` / `sink_snapshots` belong to `skyfill.publish.sink`:
created on the sink's first start, they hold the rev of each delete and snapshot it applied, so
replayed or older messages are skipped.

All three are keyed, newest wins: upserted on a file, appended on a lake (storage/lake.py `upsert`), so
readers take a key's newest row (`identities`: the latest resolved_at; the marks: the highest rev)
and the lake's compactor prunes the rest (storage/compaction.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa

from skyfill.net.identity import IdentityRow

from .base import StoreBase
from .lake import run_ddl, upsert

__all__ = ["Caches"]

_INSERT_IDENTITIES = "INSERT INTO identities (did, pds, signing_key, handle, doc, resolved_at, error) VALUES {values}"
_IDENTITIES_CONFLICT = ("ON CONFLICT (did) DO UPDATE SET pds = excluded.pds, signing_key = excluded.signing_key, "
                        "handle = excluded.handle, doc = excluded.doc, resolved_at = excluded.resolved_at, "
                        "error = excluded.error")
# a DID's newest row (one on a file; on a lake, appended ones until the compactor prunes them)
_NEWEST_IDENTITY = ("SELECT pds, signing_key, handle, doc::VARCHAR, epoch(resolved_at), error, resolved_at "
                    "FROM identities WHERE did = ? ORDER BY resolved_at DESC LIMIT 1")

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
        rows = self.fetchall(f"SELECT * FROM ({_NEWEST_IDENTITY}) WHERE error IS NULL AND resolved_at > ?", [did, since])
        if not rows:
            return None
        pds, key, handle, doc, resolved_at, _, _ = rows[0]
        return IdentityRow(did, pds, key, handle, doc, float(resolved_at))

    def fresh_signing_keys(self, *, max_age: float, limit: int) -> dict[str, str]:
        """Signing keys of the `limit` most recently resolved DIDs (to seed a verifier)."""
        since = datetime.now(UTC) - timedelta(seconds=max_age)
        rows = self.fetchall(
            "SELECT did, signing_key FROM identities WHERE error IS NULL AND signing_key IS NOT NULL "
            "AND resolved_at > ? ORDER BY resolved_at DESC LIMIT ?", [since, limit])
        keys: dict[str, str] = {}
        for did, key in rows:
            keys.setdefault(did, key)  # newest first: a lake may hold older rows of a DID until compaction
        return keys

    def save_identities(self, rows: Sequence[IdentityRow]) -> None:
        """Upsert resolved (or failed) DID documents, all in one transaction."""
        if not rows:
            return
        newest = {r.did: r for r in rows}  # one row per DID (a file's ON CONFLICT takes a key once)
        params: list[Any] = []
        for r in newest.values():
            params += [r.did, r.pds, r.signing_key, r.handle, r.doc, datetime.fromtimestamp(r.resolved_at, UTC), r.error]
        values = ", ".join(["(?, ?, ?, ?, ?::JSON, ?, ?)"] * len(newest))
        self._txn(lambda con: upsert(con, _INSERT_IDENTITIES.format(values=values), _IDENTITIES_CONFLICT, params))

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
        tables: list[tuple[str, str, str, pa.Table]] = []
        if tombstones:
            keys = list(tombstones)
            tables.append((
                "INSERT INTO sink_tombstones SELECT * FROM _t",
                "ON CONFLICT (did, collection, rkey) DO UPDATE SET rev = excluded.rev",
                "_t",
                pa.table({"did": [k[0] for k in keys], "collection": [k[1] for k in keys],
                          "rkey": [k[2] for k in keys], "rev": [tombstones[k] for k in keys]}, schema=_TOMBS),
            ))
        if snapshots:
            snaps = list(snapshots.items())
            tables.append((
                "INSERT INTO sink_snapshots SELECT * FROM _s",
                "ON CONFLICT (did) DO UPDATE SET rev = greatest(sink_snapshots.rev, excluded.rev)",
                "_s",
                pa.table({"did": [d for d, _ in snaps], "rev": [r for _, r in snaps]}),
            ))
        if not tables:
            return

        def body(con: duckdb.DuckDBPyConnection) -> None:
            for insert, on_conflict, name, table in tables:
                con.register(name, table)
                try:
                    upsert(con, insert, on_conflict)
                finally:
                    con.unregister(name)

        self._txn(body)
