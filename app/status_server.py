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

__all__ = ["StatusServer", "PageFn"]

log = logging.getLogger(__name__)

# the query (since, until) -> the page's HTML
PageFn = Callable[[Mapping[str, str]], Awaitable[str]]

MAX_HEAD: Final = 16 * 1024
MAX_CONNECTIONS: Final = 16
HEAD_TIMEOUT: Final = 10.0
_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   500: "Internal Server Error", 503: "Service Unavailable"}
_TEXT: Final = "text/plain; charset=utf-8"
_HTML: Final = "text/html; charset=utf-8"


class StatusServer:
    def __init__(self, *, port: int, page: PageFn, host: str = "127.0.0.1") -> None:
        self._host, self._port = host, port
        self._page = page
        self._server: asyncio.base_events.Server | None = None
        self._active = 0
        self.url = ""

    async def start(self) -> None:
        """Listen; ConfigError naming --metrics-port when the port cannot be had."""
        try:
            self._server = await asyncio.start_server(self._serve, self._host, self._port, limit=MAX_HEAD)
        except OSError as exc:
            raise ConfigError(f"--metrics-port: cannot listen on {self._host}:{self._port}: "
                              f"{exc.strerror or exc}") from exc
        self.url = f"http://{self._host}:{self._server.sockets[0].getsockname()[1]}"
        log.info("status page and metrics listening", extra={"ctx": {"url": self.url}})

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._active += 1
        try:
            if self._active > MAX_CONNECTIONS:
                status, ctype, body = 503, _TEXT, b"too many connections\n"
            else:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=HEAD_TIMEOUT)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
                    return
                status, ctype, body = await self._answer(head.decode("latin-1").split("\r\n", 1)[0])
            writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
                         .encode() + body)
            await asyncio.wait_for(writer.drain(), timeout=HEAD_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            pass  # the client left
        finally:
            self._active -= 1
            writer.close()

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
