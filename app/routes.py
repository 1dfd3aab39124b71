"""The admin API's routes: what `skyfill status|gaps|backfill` ask a running daemon to do.

    GET  /status     -> storage.status_report (on a cursor of the daemon's connection)
    POST /gaps       -> `jobs.run_gaps` with the daemon's BackfillConfig as the defaults
    POST /backfill   -> `jobs.run_backfill` through the daemon's reconciler (its one writer)
    POST /enqueue    -> rows added to the backfill queue
"""

from __future__ import annotations

import asyncio
from typing import Any

from skyfill.backfill.backfiller import Reconciler
from skyfill.backfill.config import BackfillConfig
from skyfill.storage import Store
from skyfill.storage.status import status_report

from .admin import Handler
from .api import BackfillRequest, EnqueueRequest, GapsRequest, backfill_from_request, gaps_from_request

__all__ = ["AdminRoutes"]


class AdminRoutes:
    """The routes over `store`; backfills reconcile through `reconciler` (the daemon's), with
    `config` (the daemon's BackfillConfig) for every option a request leaves out."""

    def __init__(self, store: Store, *, reconciler: Reconciler, config: BackfillConfig) -> None:
        self.store = store
        self.reconciler = reconciler
        self.config = config

    def table(self) -> dict[tuple[str, str], Handler]:
        return {
            ("GET", "/status"): self.status,
            ("POST", "/gaps"): self.gaps,
            ("POST", "/backfill"): self.backfill,
            ("POST", "/enqueue"): self.enqueue,
        }

    async def status(self, _body: Any) -> Any:
        def read() -> dict[str, Any]:
            with self.store.read() as reader:
                return status_report(reader)

        return await asyncio.to_thread(read)

    async def enqueue(self, body: Any) -> Any:
        req = EnqueueRequest.parse(body)
        added = await asyncio.to_thread(self.store.enqueue, {d: [req.reason] for d in req.dids})
        return {"enqueued": added, "dids": len(req.dids)}

    async def gaps(self, body: Any) -> Any:
        return await gaps_from_request(self.store, GapsRequest.parse(body), config=self.config)

    async def backfill(self, body: Any) -> Any:
        return await backfill_from_request(self.store, BackfillRequest.parse(body), sink=self.reconciler,
                                           config=self.config)
