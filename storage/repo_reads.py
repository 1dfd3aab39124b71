"""Point reads of per-DID state for the daemon's tracker (a bounded cache filled on a miss).

The repos base is sorted by did, so `WHERE did = ?` reads one row group (zone maps); a large
set of DIDs is read with one join instead (a scan of the did column).
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from .base import StoreBase
from .batch import RepoRow

__all__ = ["RepoReads"]

# RepoRow's fields, in order (last_event_at as the text the firehose sent, like RepoRow holds it)
_HEAD = ("did, rev, data_cid, commit_cid, last_seq, CAST(last_event_at AS VARCHAR), handle, active, status, "
         "sync_state, desync_reason, desynced_at, first_seen_at")
# up to this many DIDs are read one point read each; more with one join
_POINT_READS = 32


class RepoReads(StoreBase):
    """Store methods reading the firehose-owned state of some DIDs, on a cursor of their own."""

    def repo_row(self, did: str) -> RepoRow | None:
        """The firehose-owned state of `did` as committed (None: the store has no row for it)."""
        with self.read() as reader:
            rows = reader.fetchall(f"SELECT {_HEAD} FROM repos WHERE did = ?", [did])
        return RepoRow(*rows[0]) if rows else None

    def repo_rows(self, dids: Iterable[str]) -> dict[str, RepoRow]:
        """The committed state of each of `dids` that the store holds (absent DIDs are left out)."""
        wanted = sorted(set(dids))
        out: dict[str, RepoRow] = {}
        with self.read() as reader:
            if len(wanted) <= _POINT_READS:
                for did in wanted:
                    for row in reader.fetchall(f"SELECT {_HEAD} FROM repos WHERE did = ?", [did]):
                        out[row[0]] = RepoRow(*row)
            else:
                with reader.registered("_wanted", pa.table({"did": wanted})):
                    for row in reader.fetchall(f"SELECT {_HEAD} FROM repos WHERE did IN (SELECT did FROM _wanted)"):
                        out[row[0]] = RepoRow(*row)
        return out
