"""The daemon's admin API on loopback: how ad-hoc commands reach a database the daemon holds.

    GET  /status                         -> storage.status_report
    POST /gaps      {start, end, enqueue, audit, dids}   -> gap report (runs in the daemon)
    POST /backfill  {dids | from_queue, ...}             -> backfill summary (through the daemon's writer)
    POST /enqueue   {dids: [...], reason}                -> rows added to the queue

Every request carries the bearer token the daemon wrote to `<db>.daemon.json` (mode 0600).
HTTP/1.1, one request per connection, JSON in and out: small on purpose.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from skyfill.daemon_client import remove_announcement, write_announcement
from skyfill.errors import SkyfillError

__all__ = ["AdminServer", "Handler"]

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
_MAX_BODY = 1 << 20


class AdminServer:
    def __init__(self, *, db: str, routes: dict[tuple[str, str], Handler], port: int = 0) -> None:
        self._db = db
        self._routes = routes
        self._port = port
        self._token = secrets.token_urlsafe(24)
        self._server: asyncio.base_events.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self._port)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        write_announcement(self._db, url=self.url, token=self._token)
        log.info("admin API listening", extra={"ctx": {"url": self.url}})

    async def aclose(self) -> None:
        remove_announcement(self._db)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        status, payload = 500, {"error": "internal error"}
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            length = int(headers.get("content-length", "0"))
            if length > _MAX_BODY:
                raise ValueError("body too large")
            body = orjson.loads(await reader.readexactly(length)) if length else {}
            auth = headers.get("authorization", "")
            if not hmac.compare_digest(auth, f"Bearer {self._token}"):
                status, payload = 401, {"error": "bad token"}
            elif (method, target) not in self._routes:
                status, payload = 404, {"error": f"no route {method} {target}"}
            else:
                status, payload = 200, await self._routes[(method, target)](body)
        except SkyfillError as exc:
            status, payload = 400, {"error": str(exc)}
        except (ValueError, orjson.JSONDecodeError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            status, payload = 400, {"error": f"bad request: {exc}"}
        except Exception as exc:  # the daemon must survive a failing admin call
            log.exception("admin request failed")
            status, payload = 500, {"error": repr(exc)}
        data = orjson.dumps(payload, default=str)
        writer.write(
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data
        )
        try:
            await writer.drain()
        finally:
            writer.close()
