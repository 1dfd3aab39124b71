"""Which DIDs the store may hold: a filter in front of the tracker's point reads.

At 10^7 DIDs a point read of one DID's row costs milliseconds (one row group of the did-sorted
base), and the firehose brings DIDs the store has never seen all the time (new accounts, and
every account on a fresh mirror). `KnownDids` holds the sorted 32-bit fingerprint of every DID
with a stored row, read once at start-up (4 bytes a DID: 40 MB at 10^7), plus the DIDs this
process created since. A DID whose fingerprint is absent has no stored row: the tracker starts
it fresh without a read. A present fingerprint only says "maybe" (32 bits: about n / 2^32 of
new DIDs collide), and the point read answers.

Only the daemon writes head rows while it runs (a backfill it starts goes through
`Tracker.mark_synchronized`), so the DIDs it adds are the only ones missing from the snapshot.
"""

from __future__ import annotations

import array
from bisect import bisect_left

from skyfill.storage import did_fingerprint

__all__ = ["KnownDids"]


class KnownDids:
    def __init__(self, fingerprints: array.array[int]) -> None:
        self._sorted = fingerprints    # ascending (repeats allowed), as Store.did_fingerprints returns them
        self._added: set[str] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._added)

    def may_hold(self, did: str) -> bool:
        """False: the store has no row for `did`. True: it may have one (read it)."""
        if did in self._added:
            return True
        fingerprint = did_fingerprint(did)
        i = bisect_left(self._sorted, fingerprint)
        return i < len(self._sorted) and self._sorted[i] == fingerprint

    def add(self, did: str) -> None:
        """`did` now has a row (written by this process)."""
        self._added.add(did)
