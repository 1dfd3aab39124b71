"""The bulk identity table: the PLC directory's export, newest operation per DID.

Why not the `identities` table: it has a primary key and every resolve upserts it; DuckDB rewrites
an indexed table at the commit of an upsert, which at 40M DIDs costs seconds per page. So the
export is APPENDED to `plc_log` page by page (with the `after` cursor in `enum_cursors`, same
transaction), and `fold_plc` rewrites `plc_base`: one row per DID (the newest operation), sorted by
did, so the point read of a resolve touches one row group (zone maps), like `repo_base`.

The resolver reads it as a fallback of its cache (`load_identity`: the `identities` row first,
then this table). Freshness: the export was read up to `enum_cursors.updated_at` of the
plc_export cursor; an operation newer than that is unknown here, so a row is served only while
that time is within the resolver's TTL, as a resolved_at. A tombstone or an operation a resolve
would refuse (`error`) is a miss: the per-DID resolve then gives the precise outcome.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import duckdb
import orjson
import pyarrow as pa

from skyfill.net.identity import IdentityRow
from skyfill.net.plc import PlcEntry

from .base import now_utc
from .caches import Caches
from .discovery import advance_cursor

__all__ = ["PlcBulk", "PLC_ENDPOINT", "FoldResult"]

PLC_ENDPOINT: Final = "plc_export"

_LOG = pa.schema([
    ("did", pa.string()), ("created_at", pa.timestamp("us", tz="UTC")), ("pds", pa.string()),
    ("signing_key", pa.string()), ("handle", pa.string()), ("tombstone", pa.bool_()), ("error", pa.string()),
])
_COLS: Final = "did, created_at, pds, signing_key, handle, tombstone, error"

# newest per DID over both tables; a DID's base row and log rows, newest first
_POINT_SQL: Final = f"""
SELECT pds, signing_key, handle, tombstone, error FROM (
    SELECT {_COLS} FROM plc_base WHERE did = $did
    UNION ALL SELECT {_COLS} FROM plc_log WHERE did = $did
) ORDER BY created_at DESC LIMIT 1
"""

# the same, for every DID of the registered `_want(did)` at once (one scan instead of one read each)
_BATCH_SQL: Final = f"""
SELECT did, arg_max(struct_pack(pds, signing_key, handle, tombstone, error), created_at) AS s FROM (
    SELECT {_COLS} FROM plc_base WHERE did IN (SELECT did FROM _want)
    UNION ALL SELECT {_COLS} FROM plc_log WHERE did IN (SELECT did FROM _want)
) GROUP BY did
"""

# the PDS endpoint known for each DID of `_want`: the identity cache, else the newest bulk operation
_PDS_SQL: Final = f"""
SELECT w.did, coalesce(i.pds, b.s.pds) AS pds FROM _want w
LEFT JOIN (SELECT did, pds FROM identities WHERE did IN (SELECT did FROM _want)
           QUALIFY row_number() OVER (PARTITION BY did ORDER BY resolved_at DESC) = 1) i ON i.did = w.did
LEFT JOIN ({_BATCH_SQL}) b ON b.did = w.did
WHERE coalesce(i.pds, b.s.pds) IS NOT NULL
"""

# usable folded keys of DIDs without a newer (unfolded) operation: a verifier's seed
_SEED_SQL: Final = """
SELECT did, signing_key FROM plc_base
WHERE NOT tombstone AND error IS NULL AND signing_key IS NOT NULL AND pds IS NOT NULL
  AND did NOT IN (SELECT did FROM plc_log) LIMIT ?
"""

_FOLD_SQL: Final = f"""
CREATE OR REPLACE TEMP TABLE _plc_folded AS
SELECT did, arg_max(struct_pack(created_at, pds, signing_key, handle, tombstone, error), created_at) AS s
FROM (SELECT {_COLS} FROM plc_base UNION ALL SELECT {_COLS} FROM plc_log) GROUP BY did
"""


@dataclass(frozen=True, slots=True)
class FoldResult:
    log_rows: int
    dids: int
    seconds: float


class PlcBulk(Caches):
    """Store methods of `skyfill identities sync`; `load_identity` falls back to the bulk table."""

    # the rows of the last two `prefetch_identities` (did -> row, None: no usable row), served by
    # `load_identity` without a point read each: a backfill prefetches chunk k+1 while DIDs of
    # chunk k are still in flight, so two generations are kept (bounded: two chunks)
    _bulk_ahead: dict[str, IdentityRow | None] | None = None
    _bulk_before: dict[str, IdentityRow | None] | None = None

    def save_plc_page(self, plc: str, entries: Sequence[PlcEntry], *, after: str | None, lines: int,
                      skipped: int, done: bool) -> None:
        """Append one export page and move the `after` cursor past it, in one transaction.
        `done`: the page was the last (the export is read to its end for now)."""
        now = now_utc()
        table = pa.table({
            "did": [e.did for e in entries], "created_at": [e.created_at.astimezone(UTC) for e in entries],
            "pds": [e.pds for e in entries], "signing_key": [e.signing_key for e in entries],
            "handle": [e.handle for e in entries], "tombstone": [e.tombstone for e in entries],
            "error": [e.error for e in entries],
        }, schema=_LOG)

        def body(con: duckdb.DuckDBPyConnection) -> None:
            if entries:
                con.register("_plc_page", table)
                try:
                    con.execute(f"INSERT INTO plc_log ({_COLS}) SELECT {_COLS} FROM _plc_page")
                finally:
                    con.unregister("_plc_page")
            advance_cursor(con, (plc, PLC_ENDPOINT), after, lines, skipped, now, done=done)

        self._txn(body)

    def plc_cursor(self, plc: str) -> tuple[str | None, bool]:
        """(the stored `after`, whether the export was read to its end) for the PLC at `plc`."""
        rows = self.fetchall("SELECT cursor, done FROM enum_cursors WHERE host = ? AND endpoint = ?",
                             [plc, PLC_ENDPOINT])
        return (rows[0][0], bool(rows[0][1])) if rows else (None, False)

    def plc_log_rows(self) -> int:
        return int(self.fetchall("SELECT count(*) FROM plc_log")[0][0])

    def fold_plc(self) -> FoldResult:
        """Fold plc_log into plc_base (newest operation per DID, sorted by did), in one transaction."""
        started = time.monotonic()

        def body(con: duckdb.DuckDBPyConnection) -> FoldResult:
            n = int(con.execute("SELECT count(*) FROM plc_log").fetchall()[0][0])
            if not n:
                return FoldResult(0, 0, 0.0)
            con.execute(_FOLD_SQL)
            try:
                con.execute("DELETE FROM plc_base")
                con.execute(f"INSERT INTO plc_base ({_COLS}) SELECT did, s.created_at, s.pds, s.signing_key, "
                            "s.handle, s.tombstone, s.error FROM _plc_folded ORDER BY did")
                con.execute("DELETE FROM plc_log")
                dids = int(con.execute("SELECT count(*) FROM plc_base").fetchall()[0][0])
            finally:
                con.execute("DROP TABLE IF EXISTS _plc_folded")
            return FoldResult(n, dids, time.monotonic() - started)

        return self._txn(body)  # type: ignore[no-any-return]

    # -- the resolver's fallback ---------------------------------------------------------------

    def load_identity(self, did: str, *, max_age: float) -> IdentityRow | None:
        """The cached document of `did` (`identities`), else the bulk table's, if fresh enough."""
        row = super().load_identity(did, max_age=max_age)
        if row is not None or not did.startswith("did:plc:"):
            return row
        return self.bulk_identity(did, max_age=max_age)

    def fresh_signing_keys(self, *, max_age: float, limit: int) -> dict[str, str]:
        """The cache's keys (`identities`) first; then, while the export was read within
        `max_age`, the bulk table's usable keys up to `limit` in all (a verifier's start-up seed).
        Only folded rows with no newer log row are read: the rest are resolved when needed."""
        keys = super().fresh_signing_keys(max_age=max_age, limit=limit)
        if len(keys) >= limit or self._synced_at(max_age) is None:
            return keys
        for did, key in self.fetchall(_SEED_SQL, [limit]):
            if len(keys) >= limit:
                break
            keys.setdefault(did, key)
        return keys

    def _synced_at(self, max_age: float) -> datetime | None:
        synced = self.fetchall("SELECT max(updated_at) FROM enum_cursors WHERE endpoint = ?", [PLC_ENDPOINT])
        synced_at = synced[0][0] if synced else None
        if synced_at is None or synced_at < datetime.now(UTC) - timedelta(seconds=max_age):
            return None
        return synced_at  # type: ignore[no-any-return]

    def bulk_identity(self, did: str, *, max_age: float) -> IdentityRow | None:
        """`did` as the PLC export says, when the export was read within `max_age` seconds."""
        for ahead in (self._bulk_ahead, self._bulk_before):
            if ahead is not None and did in ahead:
                return ahead[did]
        synced_at = self._synced_at(max_age)
        if synced_at is None:
            return None
        with self.read() as reader:
            rows = reader.fetch_arrow(_POINT_SQL, {"did": did}).to_pylist()
        return _usable(did, rows[0], synced_at) if rows else None

    def prefetch_identities(self, dids: Sequence[str], *, max_age: float) -> int:
        """Read the bulk rows of `dids` in one query, for `load_identity` to serve (a point read
        costs ~15 ms at 2M DIDs: one row group scanned per DID; a batch of 500 is one scan).
        Returns the DIDs with a usable row."""
        synced_at = self._synced_at(max_age)
        self._bulk_before = self._bulk_ahead
        if synced_at is None or not dids:
            self._bulk_ahead = None
            return 0
        with self.read() as reader, reader.registered("_want", pa.table({"did": list(dids)})):
            rows = reader.fetch_arrow(_BATCH_SQL).to_pylist()
        ahead: dict[str, IdentityRow | None] = dict.fromkeys(dids)
        for row in rows:
            ahead[row["did"]] = _usable(row["did"], row["s"], synced_at)
        self._bulk_ahead = ahead
        return sum(1 for r in ahead.values() if r is not None)

    def known_pds(self, dids: Sequence[str]) -> dict[str, str]:
        """The PDS endpoint stored for each of `dids` that has one, whatever its age (the identity
        cache, else the bulk PLC rows): no request is made. For routing, not for verifying."""
        if not dids:
            return {}
        with self.read() as reader, reader.registered("_want", pa.table({"did": list(dids)})):
            return {did: pds for did, pds in reader.fetchall(_PDS_SQL)}


def _usable(did: str, r: dict[str, object], synced_at: datetime) -> IdentityRow | None:
    pds, key, handle = r["pds"], r["signing_key"], r["handle"]
    if r["tombstone"] or r["error"] is not None or not isinstance(pds, str) or not isinstance(key, str):
        return None
    handle = handle if isinstance(handle, str) else None
    return IdentityRow(did, pds, key, handle, _doc(did, pds, key, handle), synced_at.timestamp())


def _doc(did: str, pds: str, key: str, handle: str | None) -> str:
    """The DID document PLC serves for these values (what parse_did_doc read them from)."""
    return orjson.dumps({
        "id": did,
        "alsoKnownAs": [f"at://{handle}"] if handle else [],
        "verificationMethod": [{"id": f"{did}#atproto", "type": "Multikey", "controller": did,
                                "publicKeyMultibase": key}],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds}],
    }).decode()
