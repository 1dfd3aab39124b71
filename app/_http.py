"""The daemon's two small HTTP servers on loopback (admin.py, status_server.py) share this: listen,
serve at most `max_connections` at once (the next ones get 503 at once), one request per
connection, a reply with Content-Length and `Connection: close`, then a lingering close.

Each server answers a connection with `answer(reader)`: it reads what it needs of the request and
returns the `Reply`, or None when the peer went away before sending one (nothing is written).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from skyfill.errors import ConfigError

__all__ = ["Reply", "LoopbackServer", "Answer", "MAX_HEAD", "LINGER", "DISCARD_MAX"]

MAX_HEAD: Final = 16 * 1024
LINGER: Final = 2.0
DISCARD_MAX: Final = 1 << 20

_REASONS: Final = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
                   408: "Request Timeout", 411: "Length Required", 413: "Payload Too Large",
                   431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    no_store: bool = False

    def encode(self) -> bytes:
        cache = "Cache-Control: no-store\r\n" if self.no_store else ""
        return (f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Error')}\r\n"
                f"Content-Type: {self.content_type}\r\nContent-Length: {len(self.body)}\r\n{cache}"
                "Connection: close\r\n\r\n").encode() + self.body


Answer = Callable[[asyncio.StreamReader], Awaitable[Reply | None]]


class LoopbackServer:
    """Listens on host:port and hands each connection to `answer`, at most `max_connections` at once."""

    def __init__(self, *, answer: Answer, busy: Reply, host: str = "127.0.0.1", port: int = 0,
                 max_connections: int, write_timeout: float) -> None:
        self._answer = answer
        self._busy = busy
        self._host, self._port = host, port
        self._max_connections = max_connections
        self._write_timeout = write_timeout
        self._active = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self, what: str) -> str:
        """Listen; returns the URL. ConfigError naming `what` when the port cannot be had."""
        try:
            self._server = await asyncio.start_server(self._serve, self._host, self._port, limit=MAX_HEAD)
        except OSError as exc:
            raise ConfigError(f"{what}: cannot listen on {self._host}:{self._port}: {exc.strerror or exc}") from exc
        return f"http://{self._host}:{self._server.sockets[0].getsockname()[1]}"

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._active += 1
        try:
            reply = self._busy if self._active > self._max_connections else await self._answer(reader)
            if reply is None:
                return  # the peer went away before sending a request: nothing to answer
            writer.write(reply.encode())
            await asyncio.wait_for(writer.drain(), timeout=self._write_timeout)
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


async def _discard(reader: asyncio.StreamReader) -> None:
    left = DISCARD_MAX
    while left > 0:
        chunk = await reader.read(min(left, 65536))
        if not chunk:
            return
        left -= len(chunk)
