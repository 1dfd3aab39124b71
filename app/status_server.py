"""The daemon's metrics port (`skyfill consume --metrics-port PORT`, on 127.0.0.1): two pages.

    GET /metrics                 Prometheus text format (skyfill.metrics.REGISTRY)
    GET /?since=...&until=...    the status page (status_page.py, status_html.py); default last 24 h

No token, like the Prometheus endpoint it replaces: loopback only, read only, and a request costs a
few aggregate reads of the store (on a read cursor: the writer does not wait). HTTP/1.1, one
request per connection; a request head must arrive within `HEAD_TIMEOUT`, at most
`MAX_CONNECTIONS` are served at once (the next ones get 503).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Final
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from skyfill import metrics
from skyfill.errors import ConfigError, SkyfillError

from ._http import LoopbackServer, Reply

__all__ = ["StatusServer", "PageFn"]

log = logging.getLogger(__name__)

# the query (since, until) -> the page's HTML
PageFn = Callable[[Mapping[str, str]], Awaitable[str]]

MAX_CONNECTIONS: Final = 16
HEAD_TIMEOUT: Final = 10.0
_TEXT: Final = "text/plain; charset=utf-8"
_HTML: Final = "text/html; charset=utf-8"


class StatusServer:
    def __init__(self, *, port: int, page: PageFn, host: str = "127.0.0.1") -> None:
        self._page = page
        self._http = LoopbackServer(answer=self._read, busy=Reply(503, _TEXT, b"too many connections\n", no_store=True),
                                    host=host, port=port, max_connections=MAX_CONNECTIONS, write_timeout=HEAD_TIMEOUT)
        self.url = ""

    async def start(self) -> None:
        """Listen; ConfigError naming --metrics-port when the port cannot be had."""
        self.url = await self._http.start("--metrics-port")
        log.info("status page and metrics listening", extra={"ctx": {"url": self.url}})

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _read(self, reader: asyncio.StreamReader) -> Reply | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=HEAD_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            return None
        status, ctype, body = await self._answer(head.decode("latin-1").split("\r\n", 1)[0])
        return Reply(status, ctype, body, no_store=True)

    async def _answer(self, request_line: str) -> tuple[int, str, bytes]:
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, _TEXT, b"malformed request line\n"
        method, target = parts[0], urlsplit(parts[1])
        if method != "GET":
            return 405, _TEXT, b"GET only\n"
        if target.path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(metrics.REGISTRY)
        if target.path not in ("/", "/index.html"):
            return 404, _TEXT, b"not found: try / (status page) or /metrics\n"
        try:
            html = await self._page(dict(parse_qsl(target.query)))
        except ConfigError as exc:
            return 400, _TEXT, f"{' '.join(str(exc).split())}\n".encode()
        except SkyfillError as exc:
            log.warning("status page failed", extra={"ctx": {"error": str(exc)}})
            return 500, _TEXT, f"{' '.join(str(exc).split())}\n".encode()
        except Exception:  # a bug: the daemon must survive it, the log must show it
            log.exception("status page failed")
            return 500, _TEXT, b"internal error (see the daemon's log)\n"
        return 200, _HTML, html.encode()
