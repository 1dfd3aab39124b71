"""The SQL of the whole-network gap reasons (skyfill.backfill.network runs them).

A DID's listing is the newest row of `listed_repos` (highest `n`) per column that a listing
said something about: the newest rev any listRepos gave (listReposByCollection gives none), and
the newest `active` (unknown counts as active). Worked example: listRepos said rev 3l..a active,
then listReposByCollection named the DID -> rev 3l..a, active.

    unseen          listed and active, no `repos` row at all (never held)
    stale           listed and active, held, and the listed rev is newer than the held rev (or
                    none is held); DIDs with a terminal backfill outcome are left out
    filter_changed  held, backfilled, active, and the collections filter of its last backfill
                    (`backfill_filters`, newest row) is one of `$filters` (those the caller found
                    not to cover the requested collections); a DID with no filter row was
                    backfilled whole (every collection)
"""

from __future__ import annotations

from typing import Final

from .queries import not_terminal

__all__ = ["LISTED_GAPS_SQL", "UNSEEN_SQL", "STALE_SQL", "FILTER_CHANGED_SQL", "FILTERS_SQL", "LISTED_COUNT_SQL"]

_LISTED: Final = """
WITH listed AS (
    SELECT did,
           arg_max(rev, n) FILTER (WHERE rev IS NOT NULL) AS rev,
           coalesce(arg_max(active, n) FILTER (WHERE active IS NOT NULL), TRUE) AS active
    FROM listed_repos GROUP BY did
)"""

# both listing reasons in one pass over the listings and one join with `repos`: (did, reason)
LISTED_GAPS_SQL: Final = f"""{_LISTED}
SELECT l.did, CASE WHEN r.did IS NULL THEN 'unseen' ELSE 'stale' END AS reason
FROM listed l LEFT JOIN repos r ON r.did = l.did
WHERE l.active AND (r.did IS NULL
                    OR (l.rev IS NOT NULL AND (r.rev IS NULL OR l.rev > r.rev) AND {not_terminal('r')}))
"""

UNSEEN_SQL: Final = f"""{_LISTED}
SELECT l.did FROM listed l LEFT JOIN repos r ON r.did = l.did
WHERE l.active AND r.did IS NULL
"""

STALE_SQL: Final = f"""{_LISTED}
SELECT l.did FROM listed l JOIN repos r ON r.did = l.did
WHERE l.active AND l.rev IS NOT NULL AND (r.rev IS NULL OR l.rev > r.rev) AND {not_terminal('r')}
"""

_FILTERS: Final = """
WITH filters AS (SELECT did, arg_max(filter, recorded_at) AS filter FROM backfill_filters GROUP BY did)"""

# the distinct filters in use (few: one per --collections setting ever used)
FILTERS_SQL: Final = f"{_FILTERS} SELECT DISTINCT filter FROM filters"

FILTER_CHANGED_SQL: Final = f"""{_FILTERS}
SELECT r.did FROM repos r JOIN filters f ON f.did = r.did
WHERE list_contains($filters, f.filter) AND r.backfilled_at IS NOT NULL AND r.active AND {not_terminal('r')}
"""

LISTED_COUNT_SQL: Final = "SELECT count(DISTINCT did) FROM listed_repos"
