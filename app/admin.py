"""The daemon's admin API on loopback: how ad-hoc commands reach a database the daemon holds.

    GET  /status                         -> storage.status_report
    POST /gaps      {start, end, enqueue, audit, dids}   -> gap report (runs in the daemon)
    POST /backfill  {dids | from_queue, ...}             -> backfill summary (through the daemon's writer)
    POST /enqueue   {dids: [...], reason}                -> rows added to the queue

Every request carries the bearer token the daemon wrote to `<db>.daemon.json` (mode 0600).
HTTP/1.1, one request per connection, JSON in and out: small on purpose.

Order of a request, so that nobody without the token costs the daemon more than a header read:
the head (deadline `HEAD_TIMEOUT`) -> the token, from the headers alone (401, nothing more said)
-> the route -> the body (at most `MAX_BODY` bytes, deadline `BODY_TIMEOUT`) -> JSON -> the
route's typed parse (400 with one line) -> the handler. At most `MAX_CONNECTIONS` connections are
served at once; the next ones get 503 at once and are closed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from .daemon_client import remove_announcement, write_announcement
from skyfill.errors import ConfigError, SkyfillError

__all__ = ["AdminServer", "Handler", "MAX_BODY", "MAX_CONNECTIONS", "HEAD_TIMEOUT", "BODY_TIMEOUT"]

log = logging.getLogger(__name__)

# The parsed JSON body ({} for GET) -> a JSON-ready answer. Handlers parse the body into their
# own typed request and raise ConfigError (-> 400) when it does not fit.
Handler = Callable[[Any], Awaitable[Any]]

MAX_BODY = 1 << 20
MAX_HEAD = 16 * 1024
MAX_CONNECTIONS = 32
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
LINGER = 2.0

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 408: "Request Timeout",
            411: "Length Required", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


class _Reply(Exception):
    """Stop handling a request and answer it with this status and one-line error."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


class AdminServer:
    def __init__(self, *, db: str, routes: dict[tuple[str, str], Handler], port: int = 0,
                 max_connections: int = MAX_CONNECTIONS, head_timeout: float = HEAD_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"admin port must be 0..65535, not {port}")
        self._db = db
        self._routes = routes
        self._port = port
        self._token = secrets.token_urlsafe(24)
        self._expected = f"Bearer {self._token}".encode()
        self._max_connections = max_connections
        self._head_timeout = head_timeout
        self._body_timeout = body_timeout
        self._active = 0
        self._server: asyncio.base_events.Server | None = None
        self.url = ""

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self._port, limit=MAX_HEAD)
        except OSError as exc:
            raise ConfigError(f"admin API: cannot listen on 127.0.0.1:{self._port}: {exc.strerror or exc}") from exc
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        try:
            write_announcement(self._db, url=self.url, token=self._token)
        except SkyfillError:
            self._server.close()
            await self._server.wait_closed()
            raise
        log.info("admin API listening", extra={"ctx": {"url": self.url}})

    async def aclose(self) -> None:
        try:
            remove_announcement(self._db)
        except SkyfillError as exc:
            log.warning("admin API: %s", exc)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._active += 1
        try:
            if self._active > self._max_connections:
                status, payload = 503, {"error": "too many connections"}
            else:
                status, payload = await self._answer(reader)
            if status == 0:
                return  # the peer went away before sending a request: nothing to answer
            data = orjson.dumps(payload, default=str)
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data
            )
            await asyncio.wait_for(writer.drain(), timeout=self._head_timeout)
            # Lingering close: a reply sent before the request was read (401, 503, 413 ...) would be
            # lost to the TCP reset that closing over unread bytes causes. Say we are done, then
            # discard what the client still sends, for a short while.
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(_discard(reader), timeout=LINGER)
        except (OSError, asyncio.TimeoutError):
            pass  # the client left or stopped reading: nothing more to do for it
        finally:
            self._active -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, Any]:
        try:
            method, target, headers = await self._read_head(reader)
            self._authenticate(headers)
            handler = self._routes.get((method, target))
            if handler is None:
                raise _Reply(404, f"no route {method} {target}")
            body = await self._read_body(reader, headers)
            return 200, await handler(body)
        except _Reply as reply:
            return reply.status, {"error": reply.error} if reply.status else None
        except ConfigError as exc:  # the request does not fit the route
            return 400, {"error": _one_line(exc)}
        except SkyfillError as exc:  # the work failed for a reason skyfill knows
            log.warning("admin request failed", extra={"ctx": {"error": _one_line(exc)}})
            return 500, {"error": _one_line(exc)}
        except Exception:  # a bug: the daemon must survive it, the log must show it
            log.exception("admin request failed")
            return 500, {"error": "internal error (see the daemon's log)"}

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=self._head_timeout)
        except asyncio.IncompleteReadError as exc:
            raise _Reply(0 if not exc.partial else 400, "incomplete request head") from None
        except asyncio.LimitOverrunError:
            raise _Reply(431, "request head too large") from None
        except asyncio.TimeoutError:
            raise _Reply(408, "request head not received in time") from None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Reply(400, "malformed request line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, sep, value = line.partition(":")
                if not sep:
                    raise _Reply(400, "malformed header line")
                headers[name.strip().lower()] = value.strip()
        return parts[0], parts[1], headers

    def _authenticate(self, headers: dict[str, str]) -> None:
        given = headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(given, self._expected):
            raise _Reply(401, "unauthorized")

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> Any:
        if "transfer-encoding" in headers:
            raise _Reply(411, "send the body with a Content-Length")
        text = headers.get("content-length", "0")
        if not text.isdigit() or len(text) > 9:
            raise _Reply(400, "bad Content-Length")
        length = int(text)
        if length > MAX_BODY:
            raise _Reply(413, f"body over {MAX_BODY} bytes")
        if length == 0:
            return {}
        try:
            raw = await asyncio.wait_for(reader.readexactly(length), timeout=self._body_timeout)
        except asyncio.IncompleteReadError:
            raise _Reply(400, "body shorter than its Content-Length") from None
        except asyncio.TimeoutError:
            raise _Reply(408, "body not received in time") from None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _Reply(400, "body is not JSON") from None


async def _discard(reader: asyncio.StreamReader) -> None:
    left = MAX_BODY
    while left > 0:
        chunk = await reader.read(min(left, 65536))
        if not chunk:
            return
        left -= len(chunk)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
