"""The whole-network jobs: discovery and the bulk identity sync, wired over one guarded client.

Both run on the backfiller's wiring (`open_backfiller`: the PdsClient with its host guard, size
caps, per-host rate limits and 429 parking), so a relay, a PDS and the PLC are treated exactly
like a backfill treats them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Final

from skyfill.backfill.backfiller import open_backfiller
from skyfill.backfill.config import BackfillConfig
from skyfill.backfill.discover import DiscoverySummary, discover
from skyfill.backfill.identities import SyncSummary, sync_identities
from skyfill.net.listing import ListingClient
from skyfill.net.plc import EXPORT_PAGE, PlcExport
from skyfill.storage import Store

__all__ = ["DEFAULT_DISCOVER_RELAY", "run_discover", "run_identities_sync"]

DEFAULT_DISCOVER_RELAY: Final = "https://relay1.us-east.bsky.network"


async def run_discover(
    store: Store, *, relay: str, config: BackfillConfig, collections: Sequence[str] = (), restart: bool = False,
    host_concurrency: int = 16, progress: bool | None = None,
) -> DiscoverySummary:
    """Enumerate the repos `relay` (a relay, or a single PDS) lists into the store. `progress`:
    bars per phase (None: when stderr is a terminal), else a log line every 30 s."""
    async with open_backfiller(store, config=config, progress=False) as bf:
        return await discover(store, ListingClient(bf.client), relay=relay, collections=collections,
                              restart=restart, concurrency=host_concurrency,
                              allow_private_hosts=config.allow_private_hosts, progress=_terminal(progress))


async def run_identities_sync(
    store: Store, *, config: BackfillConfig, max_pages: int | None = None, page_size: int = EXPORT_PAGE,
    progress: bool | None = None,
) -> SyncSummary:
    """Import the PLC export at `config.plc_url` from the stored cursor to its end (`progress`:
    as for `run_discover`)."""
    async with open_backfiller(store, config=config, progress=False) as bf:
        export = PlcExport(bf.client, config.plc_url, count=page_size)
        return await sync_identities(store, export, max_pages=max_pages, progress=_terminal(progress))


def _terminal(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress
