"""The admin API's routes: what `skyfill status|gaps|backfill` ask a running daemon to do.

    GET  /status     -> storage.status_report (on a cursor of the daemon's connection)
    POST /gaps       -> `jobs.run_gaps` with the daemon's BackfillConfig as the defaults
    POST /backfill   -> `jobs.run_backfill` through the daemon's reconciler (its one writer)
    POST /enqueue    -> rows added to the backfill queue
    POST /status/page {since, until} -> {"html": the status page} (`skyfill status --html`)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from skyfill.backfill.backfiller import Reconciler
from skyfill.backfill.config import BackfillConfig
from skyfill.errors import ConfigError
from skyfill.storage import Store
from skyfill.storage.status import status_report

from .admin import Handler
from .api import BackfillRequest, EnqueueRequest, GapsRequest, backfill_from_request, gaps_from_request

__all__ = ["AdminRoutes"]


class AdminRoutes:
    """The routes over `store`; backfills reconcile through `reconciler` (the daemon's), with
    `config` (the daemon's BackfillConfig) for every option a request leaves out."""

    def __init__(self, store: Store, *, reconciler: Reconciler, config: BackfillConfig,
                 page: Callable[[Mapping[str, str]], Awaitable[str]] | None = None) -> None:
        self.store = store
        self.reconciler = reconciler
        self.config = config
        self.page = page

    def table(self) -> dict[tuple[str, str], Handler]:
        return {
            ("GET", "/status"): self.status,
            ("POST", "/gaps"): self.gaps,
            ("POST", "/backfill"): self.backfill,
            ("POST", "/enqueue"): self.enqueue,
            ("POST", "/status/page"): self.status_page,
        }

    async def status(self, _body: Any) -> Any:
        def read() -> dict[str, Any]:
            with self.store.read() as reader:
                return status_report(reader)

        return await asyncio.to_thread(read)

    async def status_page(self, body: Any) -> Any:
        if not isinstance(body, Mapping) or set(body) - {"since", "until"} or \
                not all(v is None or isinstance(v, str) for v in body.values()):
            raise ConfigError('/status/page: the body must be {"since": str, "until": str} (both optional)')
        if self.page is None:
            raise ConfigError("/status/page: this server has no status page")
        return {"html": await self.page({k: v for k, v in body.items() if v})}

    async def enqueue(self, body: Any) -> Any:
        req = EnqueueRequest.parse(body)
        added = await asyncio.to_thread(self.store.enqueue, {d: [req.reason] for d in req.dids})
        return {"enqueued": added, "dids": len(req.dids)}

    async def gaps(self, body: Any) -> Any:
        return await gaps_from_request(self.store, GapsRequest.parse(body), config=self.config)

    async def backfill(self, body: Any) -> Any:
        return await backfill_from_request(self.store, BackfillRequest.parse(body), sink=self.reconciler,
                                           config=self.config)
