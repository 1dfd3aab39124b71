"""The whole-network gap reasons: `unseen`, `stale`, `filter_changed` (backfill/gaps.py merges them).

    unseen          a listed (discovered) DID the mirror never held
    stale           a listed DID whose listed rev is newer than the rev held: a whole-network
                    resync fetches only what changed since
    filter_changed  a backfilled DID whose last backfill's collections filter does not cover
                    `collections` (what the caller wants now): e.g. backfilled with
                    `app.bsky.feed.post`, asked for `app.bsky.feed.*` -> flagged; backfilled
                    whole (no filter) -> never flagged

The SQL is storage/network_gaps.py; Python decides only which stored filters fall short, over the
few distinct filters in use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from skyfill.protocol.syntax import collection_matcher
from skyfill.storage import Reader
from skyfill.storage.discovery import ALL_COLLECTIONS
from skyfill.storage.network_gaps import FILTER_CHANGED_SQL, FILTERS_SQL, LISTED_GAPS_SQL

__all__ = ["UNSEEN", "STALE", "FILTER_CHANGED", "network_gaps", "covers"]

UNSEEN: Final = "unseen"
STALE: Final = "stale"
FILTER_CHANGED: Final = "filter_changed"


def covers(stored: str, wanted: Sequence[str]) -> bool:
    """Whether a backfill with the stored (canonical) filter fetched every collection `wanted`
    names. A wanted prefix `a.b.*` is covered by `*` or a stored prefix that contains it."""
    if stored == ALL_COLLECTIONS:
        return True
    patterns = stored.split(",")
    match = collection_matcher(patterns)
    for want in wanted:
        if want == ALL_COLLECTIONS:
            return False
        if want.endswith(".*"):
            stem = want[:-1]  # "a.b."
            if not any(p.endswith(".*") and stem.startswith(p[:-1]) for p in patterns):
                return False
        elif match is not None and not match(want):
            return False
    return True


def _column(reader: Reader, sql: str, params: dict[str, object] | None = None) -> list[str]:
    table = reader.fetch_arrow(sql, params)
    return table.column(0).to_pylist() if table.num_rows else []


def network_gaps(reader: Reader, *, collections: Sequence[str] = ()) -> dict[str, list[str]]:
    """{reason: DIDs} for the three reasons (filter_changed only when `collections` is given)."""
    found: dict[str, list[str]] = {UNSEEN: [], STALE: [], FILTER_CHANGED: []}
    listed = reader.fetch_arrow(LISTED_GAPS_SQL)
    for did, reason in zip(listed.column(0).to_pylist(), listed.column(1).to_pylist(), strict=True):
        found[reason].append(did)
    if collections:
        short = [f for f in _column(reader, FILTERS_SQL) if not covers(f, collections)]
        if short:
            found[FILTER_CHANGED] = _column(reader, FILTER_CHANGED_SQL, {"filters": short})
    return found
