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

from ._http import LoopbackServer, Reply
from .daemon_client import remove_announcement, write_announcement
from skyfill.errors import ConfigError, SkyfillError

__all__ = ["AdminServer", "Handler", "MAX_BODY", "MAX_CONNECTIONS", "HEAD_TIMEOUT", "BODY_TIMEOUT"]

log = logging.getLogger(__name__)

# The parsed JSON body ({} for GET) -> a JSON-ready answer. Handlers parse the body into their
# own typed request and raise ConfigError (-> 400) when it does not fit.
Handler = Callable[[Any], Awaitable[Any]]

MAX_BODY = 1 << 20
MAX_CONNECTIONS = 32
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
_JSON = "application/json"


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
        self._token = secrets.token_urlsafe(24)
        self._expected = f"Bearer {self._token}".encode()
        self._head_timeout = head_timeout
        self._body_timeout = body_timeout
        self._http = LoopbackServer(answer=self._read, busy=_json_reply(503, {"error": "too many connections"}),
                                    port=port, max_connections=max_connections, write_timeout=head_timeout)
        self.url = ""

    async def start(self) -> None:
        self.url = await self._http.start("admin API")
        try:
            write_announcement(self._db, url=self.url, token=self._token)
        except SkyfillError:
            await self._http.aclose()
            raise
        log.info("admin API listening", extra={"ctx": {"url": self.url}})

    async def aclose(self) -> None:
        try:
            remove_announcement(self._db)
        except SkyfillError as exc:
            log.warning("admin API: %s", exc)
        await self._http.aclose()

    async def _read(self, reader: asyncio.StreamReader) -> Reply | None:
        status, payload = await self._answer(reader)
        return None if status == 0 else _json_reply(status, payload)

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


def _json_reply(status: int, payload: Any) -> Reply:
    return Reply(status, _JSON, orjson.dumps(payload, default=str))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
