"""Point reads of per-DID state for the daemon's tracker (a bounded cache filled on a miss).

The repos base is sorted by did, so `WHERE did = ?` reads one row group (zone maps). One DID is
one statement of two plain point reads (base, log) merged as the `repos` view does
(storage/repos.py): planning the view itself costs several times more than the reads. Many DIDs are one join on the view (a scan).
"""

from __future__ import annotations

import array
import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Final

import pyarrow as pa

from . import repos
from .base import StoreBase
from .batch import RepoRow

__all__ = ["RepoReads", "did_fingerprint"]

# A DID's fingerprint: the first 32 bits of its MD5, the same in SQL and in Python.
_FINGERPRINT_SQL: Final = "('0x' || substr(md5(did), 1, 8))::UINTEGER"


def did_fingerprint(did: str) -> int:
    """The fingerprint `RepoReads.did_fingerprints` lists (32 bits: distinct DIDs may share one)."""
    return int.from_bytes(hashlib.md5(did.encode()).digest()[:4], "big")


_FINGERPRINTS: Final = (f"SELECT {_FINGERPRINT_SQL} AS f FROM (SELECT did FROM repo_base UNION ALL "
                        "SELECT did FROM repo_log) ORDER BY f")

# RepoRow's fields, in order (last_event_at as the text the firehose sent, like RepoRow holds it)
_HEAD = ("did, rev, data_cid, commit_cid, last_seq, CAST(last_event_at AS VARCHAR), handle, active, status, "
         "sync_state, desync_reason, desynced_at, first_seen_at")
_POINT_SQL = repos.point_sql(repos.HEAD_FIELDS)
# up to this many DIDs are read one point read each; more with one join
_POINT_READS = 32


def _text(value: datetime | None) -> str | None:
    """RepoRow.last_event_at is text (the event's `time`); the store parses it back on write."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat()


class RepoReads(StoreBase):
    """Store methods reading the firehose-owned state of some DIDs, on a cursor of their own."""

    def did_fingerprints(self) -> array.array[int]:
        """The fingerprints of every DID with a `repos` row, ascending (4 bytes a DID; a DID with
        rows in both the base and the log is listed twice): a DID whose fingerprint is not in it
        has no row, which a point read would take milliseconds to say.

        Streamed into the array batch by batch: no DISTINCT (a hash table of every DID) and no
        whole Arrow result beside the array."""
        out = array.array("I")
        with self.read() as reader:
            for batch in reader.arrow_batches(_FINGERPRINTS):
                column = batch.column(0)
                data = column.buffers()[1]
                assert column.null_count == 0
                if data is not None and len(column):
                    out.frombytes(memoryview(data)[column.offset * 4 : (column.offset + len(column)) * 4])
        return out

    def repo_row(self, did: str) -> RepoRow | None:
        """The firehose-owned state of `did` as committed (None: the store has no row for it)."""
        with self.read() as reader:
            rows = reader.fetchall(_POINT_SQL, [did, did])
        row = repos.merge_point(repos.HEAD_FIELDS, rows)
        return None if row is None else RepoRow(did, *row[:4], _text(row[4]), *row[5:])

    def repo_rows(self, dids: Iterable[str]) -> dict[str, RepoRow]:
        """The committed state of each of `dids` that the store holds (absent DIDs are left out)."""
        wanted = sorted(set(dids))
        out: dict[str, RepoRow] = {}
        if len(wanted) <= _POINT_READS:
            for did in wanted:
                if (row := self.repo_row(did)) is not None:
                    out[did] = row
            return out
        with self.read() as reader, reader.registered("_wanted", pa.table({"did": wanted})):
            for row in reader.fetchall(f"SELECT {_HEAD} FROM repos WHERE did IN (SELECT did FROM _wanted)"):
                out[row[0]] = RepoRow(*row)
        return out
