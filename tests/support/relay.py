"""A real local relay for tests: a WebSocket server replaying real firehose frames on 127.0.0.1.

It speaks subscribeRepos the way a relay does: `?cursor=N` replays frames with seq > N, a cursor
beyond the newest seq gets a FutureCursor error frame and a close, no cursor starts at the live
head. Frames appended later are pushed to every connected subscriber (live mode). Runs in its
own thread so a daemon in a subprocess or in the test's own event loop can connect to it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from urllib.parse import parse_qs, urlsplit

import libipld
import websockets
from websockets.asyncio.server import ServerConnection, serve

__all__ = ["LocalRelay", "frame_seq", "error_frame", "info_frame"]


def frame_seq(frame: bytes) -> int | None:
    """The body's integer seq, or None for a frame the relay cannot place (it is then always sent)."""
    try:
        header, body = libipld.decode_dag_cbor_multi(frame)
    except (ValueError, RecursionError):  # libipld raises RecursionError on deep nesting
        return None
    seq = body.get("seq") if isinstance(body, dict) else None
    return seq if type(seq) is int else None


def error_frame(error: str, message: str) -> bytes:
    return libipld.encode_dag_cbor({"op": -1}) + libipld.encode_dag_cbor({"error": error, "message": message})


def info_frame(name: str, message: str) -> bytes:
    return libipld.encode_dag_cbor({"op": 1, "t": "#info"}) + libipld.encode_dag_cbor({"name": name, "message": message})


class LocalRelay:
    def __init__(self, frames: Iterable[bytes] = (), *, port: int = 0) -> None:
        self._frames: list[tuple[int | None, bytes]] = [(frame_seq(f), f) for f in frames]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._clients: set[ServerConnection] = set()
        self._new = asyncio.Condition()
        self.connections: list[str] = []  # the request path of every connection, in order
        self._closing = False
        self.port = port

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> LocalRelay:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await serve(
            self._handler, "127.0.0.1", self.port, max_size=None, compression=None, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def _stop() -> None:
            async with self._new:
                self._closing = True
                self._new.notify_all()
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> LocalRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control from the test ------------------------------------------------------------

    def append(self, frames: Iterable[bytes]) -> None:
        """Publish more frames: stored for replay and pushed to live subscribers."""
        new = [(frame_seq(f), f) for f in frames]

        async def _append() -> None:
            async with self._new:
                self._frames.extend(new)
                self._new.notify_all()

        asyncio.run_coroutine_threadsafe(_append(), self._loop).result(10)

    def send_to_all(self, frame: bytes, *, close: bool = False) -> None:
        """Send one raw frame (e.g. an error frame) to every connected subscriber."""

        async def _send() -> None:
            for ws in list(self._clients):
                try:
                    await ws.send(frame)
                    if close:
                        await ws.close()
                except websockets.ConnectionClosed:
                    pass

        asyncio.run_coroutine_threadsafe(_send(), self._loop).result(10)

    def drop_all(self) -> None:
        """Cut every subscriber off abruptly (a network drop)."""

        async def _drop() -> None:
            for ws in list(self._clients):
                ws.transport.abort()

        asyncio.run_coroutine_threadsafe(_drop(), self._loop).result(10)

    @property
    def head(self) -> int:
        return max((s for s, _ in self._frames if s is not None), default=0)

    # -- serving --------------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request else "/"
        self.connections.append(path)
        query = parse_qs(urlsplit(path).query)
        cursor = int(query["cursor"][0]) if "cursor" in query else None
        if cursor is not None and cursor > self.head:
            await ws.send(error_frame("FutureCursor", "Cursor in the future."))
            await ws.close(1008)
            return
        self._clients.add(ws)
        try:
            # position = index of the next frame to send
            if cursor is None:
                pos = len(self._frames)
            else:
                pos = next((i for i, (s, _) in enumerate(self._frames) if s is None or s > cursor), len(self._frames))
            while True:
                async with self._new:
                    while pos >= len(self._frames) and not self._closing:
                        try:
                            await asyncio.wait_for(self._new.wait(), timeout=0.5)
                        except asyncio.TimeoutError:
                            if ws.state.name != "OPEN":  # the subscriber went away
                                return
                    if self._closing:
                        return
                    pending = self._frames[pos:]
                    pos = len(self._frames)
                for _, frame in pending:
                    await ws.send(frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._clients.discard(ws)
