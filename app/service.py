"""What runs beside the daemon: the Kafka publisher, the in-daemon backfiller, the admin routes.

Wiring lives here so the daemon itself only knows "publish this batch" and "here is a sink".
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .api import BackfillRequest, EnqueueRequest, GapsRequest, backfill_from_request, gaps_from_request
from skyfill.storage import Store
from skyfill.storage.status import status_report

from skyfill.consumer.resync import DaemonReconciler

if TYPE_CHECKING:
    from skyfill.consumer.daemon import Daemon

__all__ = ["Services"]

log = logging.getLogger(__name__)


class Services:
    def __init__(
        self, store: Store, *, plc_url: str, allow_private_hosts: bool, kafka_bootstrap: str | None,
        backfill_interval: float = 5.0,
    ) -> None:
        self.store = store
        self.plc_url = plc_url
        self.allow_private_hosts = allow_private_hosts
        self.kafka_bootstrap = kafka_bootstrap
        self.backfill_interval = backfill_interval
        self.daemon: Daemon | None = None
        self._publisher: Any = None
        self.publish = None

    async def start(self) -> None:
        if self.kafka_bootstrap:
            from skyfill.publish import KafkaPublisher

            self._publisher = KafkaPublisher(self.kafka_bootstrap)
            await self._publisher.start()
            self.publish = self._publisher.publish

    def attach(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def aclose(self) -> None:
        if self._publisher is not None:
            await self._publisher.aclose()

    # -- admin routes ---------------------------------------------------------------------

    def routes(self) -> dict[tuple[str, str], Any]:
        return {
            ("GET", "/status"): self._status,
            ("POST", "/gaps"): self._gaps,
            ("POST", "/backfill"): self._backfill,
            ("POST", "/enqueue"): self._enqueue,
        }

    async def _status(self, _body: Any) -> Any:
        def read() -> dict[str, Any]:
            with self.store.read() as reader:
                return status_report(reader)

        return await asyncio.to_thread(read)

    async def _enqueue(self, body: Any) -> Any:
        req = EnqueueRequest.parse(body)
        added = await asyncio.to_thread(self.store.enqueue, {d: [req.reason] for d in req.dids})
        return {"enqueued": added, "dids": len(req.dids)}

    async def _gaps(self, body: Any) -> Any:
        req = GapsRequest.parse(body)
        return await gaps_from_request(self.store, req, plc_url=self.plc_url,
                                       allow_private_hosts=self.allow_private_hosts)

    async def _backfill(self, body: Any) -> Any:
        req = BackfillRequest.parse(body)
        assert self.daemon is not None
        return await backfill_from_request(self.store, req, sink=DaemonReconciler(self.daemon),
                                           plc_url=self.plc_url, allow_private_hosts=self.allow_private_hosts)

    async def backfill_forever(self) -> None:
        """`consume --backfill`: keep desynchronized and queued DIDs repaired, like Tap's resyncers."""
        from .api import backfill_queue_once

        from skyfill.consumer.resync import DaemonReconciler

        from skyfill.backfill.backfiller import recover_queue

        assert self.daemon is not None
        sink = DaemonReconciler(self.daemon)
        await asyncio.to_thread(recover_queue, self.store)  # claims a crash left 'in_progress'
        while True:
            try:
                await backfill_queue_once(self.store, sink=sink, plc_url=self.plc_url,
                                          allow_private_hosts=self.allow_private_hosts)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background backfill round failed; retrying")
            await asyncio.sleep(self.backfill_interval)
