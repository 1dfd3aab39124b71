"""SQL predicates over the stored states, written once for every reader.

The gap detector, `skyfill backfill --all`, the backfill queue's repair-loop query (queue.py) and
the desynchronized-DIDs gauge all ask the same two questions of `repos`: "is this outcome final?" and "did this
DID's chain break?". The values are the `states` enums, never user input, so they are inlined.
"""

from __future__ import annotations

from typing import Final

from .repos import count_heads_sql
from .states import TERMINAL_BACKFILL, SyncState

__all__ = ["not_terminal", "DESYNCHRONIZED", "COUNT_DESYNCHRONIZED_SQL"]

_TERMINAL_LIST: Final = "(" + ", ".join(f"'{s.value}'" for s in sorted(TERMINAL_BACKFILL)) + ")"

# the chain of the DID broke; a backfill must repair it (reason in desync_reason)
DESYNCHRONIZED: Final = f"sync_state = '{SyncState.DESYNCHRONIZED.value}'"

# the DESYNCHRONIZED_DIDS gauge (= count(*) FROM repos WHERE DESYNCHRONIZED, read at the daemon's
# start and every 10 s: through the view it took 1.5-13 s at 10M DIDs, this 0.8 s)
COUNT_DESYNCHRONIZED_SQL: Final = count_heads_sql(DESYNCHRONIZED)


def not_terminal(alias: str = "") -> str:
    """The repo row (of table `alias`) has no final backfill outcome: a backfill may still help."""
    p = f"{alias}." if alias else ""
    return f"({p}backfill_status IS NULL OR {p}backfill_status NOT IN {_TERMINAL_LIST})"
