"""The one wiring root: `skyfill consume` as an object.

`Application(settings)` builds, in one step, everything that runs beside the firehose:

    Store ── Daemon (skyfill.consumer) ── CommitVerifier (--verify: PLC keys via a PdsClient)
      │        └── DaemonReconciler: the daemon's writer, for every backfill while it runs
      ├── KafkaPublisher (--kafka-bootstrap): each batch acknowledged before it is stored
      ├── background repair loop (--backfill): `jobs.backfill_queue_once` every few seconds
      ├── AdminServer + AdminRoutes: `skyfill status|gaps|backfill|enqueue` from other processes
      ├── IngestHistory: the daemon's own metrics sampled every 10 s for 24 h (the status page's history)
      └── StatusServer (--metrics-port): the status page at `/`, Prometheus metrics at `/metrics`

Every backfill the daemon runs (its own loop, the admin API's) uses `settings.backfill`, the
BackfillConfig the user gave. `run()` starts the parts, runs the daemon until it stops (SIGINT/
SIGTERM, `stop()`, or an error) and closes them in reverse order; it returns the exit code:
0 after a clean stop, 3 on FutureCursor with --strict-cursor, 4 after a fatal storage error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace

from skyfill.backfill.backfiller import recover_queue
from skyfill.consumer.daemon import Daemon
from skyfill.consumer.resync import DaemonReconciler
from skyfill.consumer.verify import CommitVerifier
from skyfill.errors import FutureCursorError, SkyfillError
from skyfill.net.identity import Resolver
from skyfill.net.pds import PdsClient
from skyfill.publish import KafkaPublisher
from skyfill.storage import Store

from .admin import AdminServer
from .jobs import backfill_queue_once
from .live import IngestHistory
from .routes import AdminRoutes
from .settings import Settings
from .status_html import CachedPages
from .status_server import StatusServer

__all__ = ["Application", "serve", "EXIT_OK", "EXIT_FUTURE_CURSOR", "EXIT_FATAL"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FUTURE_CURSOR = 3  # FutureCursor and --strict-cursor forbids skipping ahead
EXIT_FATAL = 4          # a write that failed for good, or a frame over the hard cap

# Keys of first-seen DIDs are fetched ahead of their events, many at once (consumer/verify.py).
_VERIFY_CONCURRENCY = 32


class Application:
    """The daemon with its backfiller, publisher, verifier, admin API and metrics.

    `store`: an open Store to run on (kept open: its owner closes it); by default the application
    opens `settings.db` and closes it when `run()` ends. An application runs once.
    """

    def __init__(self, settings: Settings, *, store: Store | None = None) -> None:
        self.settings = settings
        self._owns_store = store is None
        self.store = store if store is not None else Store(settings.db, memory_limit=settings.duckdb_memory_limit)
        try:
            self.publisher = KafkaPublisher(settings.kafka_bootstrap) if settings.kafka_bootstrap else None
            self._client: PdsClient | None = None
            self.verifier: CommitVerifier | None = None
            if settings.verify:
                self._client = PdsClient(allow_private_hosts=settings.backfill.allow_private_hosts,
                                         per_host_concurrency=_VERIFY_CONCURRENCY, max_retries=2)
                resolver = Resolver(plc_url=settings.backfill.plc_url, client=self._client, store=self.store)
                self.verifier = CommitVerifier(resolver, concurrency=_VERIFY_CONCURRENCY)
            self.daemon = Daemon(
                self.store, replace(settings.consume, publish=self.publisher is not None),
                publish=self.publisher.publish if self.publisher is not None else None, verifier=self.verifier,
            )
            self.reconciler = DaemonReconciler(self.daemon)
            self.history = IngestHistory()
            self.pages = CachedPages(self.store, source=f"daemon on {settings.db}", history=self.history)
            self.routes = AdminRoutes(self.store, reconciler=self.reconciler, config=settings.backfill,
                                      page=self.pages)
            self.admin = AdminServer(db=settings.db, routes=self.routes.table(), port=settings.admin_port)
        except BaseException:
            self._close_store()
            raise

    @property
    def admin_url(self) -> str:
        """`http://127.0.0.1:PORT` of the admin API once `run()` started it ("" before)."""
        return self.admin.url

    def stop(self) -> None:
        """Ask the daemon to stop: it drains (stores what it processed) and `run()` returns 0."""
        self.daemon.stop()

    async def run(self, *, install_signal_handlers: bool = True) -> int:
        """Start everything, run the daemon until it stops, close everything; the exit code."""
        settings = self.settings
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._close_store)
            if settings.metrics_port is not None:
                server = StatusServer(port=settings.metrics_port, page=self.pages)
                await server.start()  # ConfigError naming --metrics-port when the port is taken
                stack.push_async_callback(server.aclose)
            if self.publisher is not None:
                await self.publisher.start()
                stack.push_async_callback(self.publisher.aclose)
            if self._client is not None:
                stack.push_async_callback(self._client.aclose)
            if self.verifier is not None:
                stack.push_async_callback(self.verifier.aclose)
            await self.admin.start()
            stack.push_async_callback(self.admin.aclose)
            background = [asyncio.create_task(self.history.run())]
            if settings.run_backfill:
                background.append(asyncio.create_task(self._backfill_forever()))
            try:
                await self.daemon.run(install_signal_handlers=install_signal_handlers)
                code = EXIT_OK
            except FutureCursorError as exc:
                log.error(str(exc))
                code = EXIT_FUTURE_CURSOR
            except SkyfillError as exc:  # logged when it happened; this is the exit's line
                log.error(f"exiting: {exc}")
                code = EXIT_FATAL
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
        return code

    async def _backfill_forever(self) -> None:
        """`consume --backfill`: keep desynchronized and queued DIDs repaired, like Tap's resyncers."""
        await asyncio.to_thread(recover_queue, self.store)  # claims a crash left 'in_progress'
        while True:
            try:
                await backfill_queue_once(self.store, sink=self.reconciler, config=self.settings.backfill)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background backfill round failed; retrying")
            await asyncio.sleep(self.settings.backfill_interval)

    def _close_store(self) -> None:
        if self._owns_store:
            self.store.close()


async def serve(settings: Settings) -> int:
    """`skyfill consume`: build the application from `settings`, run it, return its exit code."""
    return await Application(settings).run()
