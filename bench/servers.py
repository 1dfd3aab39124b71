"""Local stand-ins for the network, bound to 127.0.0.1 on a free port.

- `FirehoseServer`: a relay's `subscribeRepos` WebSocket that streams pre-built frames at full
  speed, honouring `cursor` (start after that seq; a cursor beyond the last frame gets the
  `FutureCursor` error frame and close 1008). With no cursor it streams from the first frame:
  a benchmark wants the whole list, not the live head.
- `RepoServer`: one HTTP server that is both the PDS (getRepo, getLatestCommit, listRepos) and
  the PLC directory (`GET /{did}` -> DID document whose PDS endpoint is this server).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import cbrrr
import libipld
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from skyfill.protocol.car import cid_to_str, read_car

from tests.support.generate import GeneratedIdentity, World, did_document

__all__ = ["FirehoseServer", "RepoServer", "SUBSCRIBE_PATH"]

SUBSCRIBE_PATH: Final = "/xrpc/com.atproto.sync.subscribeRepos"
_FUTURE_CURSOR: Final = cbrrr.encode_dag_cbor({"op": -1}) + cbrrr.encode_dag_cbor(
    {"error": "FutureCursor", "message": "Cursor in the future."}
)


def _seq_of(frame: bytes) -> int:
    _header, body = libipld.decode_dag_cbor_multi(frame)
    return int(body["seq"])


class FirehoseServer:
    """Streams `frames` (already ordered by seq) to each subscriber.

    Use `async with FirehoseServer(frames) as srv: srv.url`, or `with srv.threaded(): ...`
    to run it on a private event loop thread next to synchronous code.
    """

    def __init__(self, frames: Sequence[bytes], *, close_when_done: bool = False) -> None:
        self._frames = frames
        self._seqs = [_seq_of(f) for f in frames]
        if any(a >= b for a, b in zip(self._seqs, self._seqs[1:])):
            raise ValueError("frames must have strictly increasing seq")
        self._close_when_done = close_when_done
        self._server: Server | None = None
        self.port = 0
        self.connections = 0
        self.frames_sent = 0

    @property
    def url(self) -> str:
        """The full subscribeRepos URL (append `?cursor=N` to resume)."""
        return f"ws://127.0.0.1:{self.port}{SUBSCRIBE_PATH}"

    @property
    def host_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._check_path,
            compression=None,
            max_size=None,
            ping_interval=None,
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FirehoseServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @contextmanager
    def threaded(self) -> Iterator[FirehoseServer]:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="bench-firehose", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout=10)
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()

    @staticmethod
    def _check_path(connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path != SUBSCRIBE_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        assert ws.request is not None
        query = parse_qs(urlsplit(ws.request.path).query)
        start = 0
        if "cursor" in query:
            try:
                cursor = int(query["cursor"][0])
            except ValueError:
                await ws.close(1008, "bad cursor")
                return
            if self._seqs and cursor > self._seqs[-1]:
                await ws.send(_FUTURE_CURSOR)
                await ws.close(1008, "FutureCursor")
                return
            start = bisect_right(self._seqs, cursor)
        frames = self._frames
        for i in range(start, len(frames)):
            await ws.send(frames[i])
            self.frames_sent += 1
        if self._close_when_done:
            await ws.close()
        else:
            await ws.wait_closed()


class RepoServer:
    """PDS + PLC directory over HTTP/1.1 (keep-alive), one thread per connection.

    `repos` maps DID -> repo CAR bytes; `identities` are the accounts whose DID documents
    `/{did}` serves (their PDS endpoint is this server unless `pds_url` is given).
    `requests` counts requests by route.
    """

    def __init__(
        self,
        repos: Mapping[str, bytes],
        identities: Iterable[GeneratedIdentity] = (),
        *,
        pds_url: str | None = None,
    ) -> None:
        self._repos = dict(repos)
        self._identities = {i.did: i for i in identities}
        self._pds_url = pds_url
        self._heads: dict[str, tuple[str, str]] = {}
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> RepoServer:
        handler = type("_Handler", (_Handler,), {"app": self})
        self._httpd = _HttpServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="bench-repo", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> RepoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def head(self, did: str) -> tuple[str, str]:
        """(commit cid, rev) read from the CAR's signed root."""
        with self._lock:
            cached = self._heads.get(did)
        if cached is None:
            roots, blocks = read_car(self._repos[did])
            commit = libipld.decode_dag_cbor(blocks[roots[0]])
            cached = (cid_to_str(roots[0]), str(commit["rev"]))
            with self._lock:
                self._heads[did] = cached
        return cached

    def route(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        """(status, content type, body) for one GET."""
        if path == "/xrpc/com.atproto.sync.getRepo":
            self.requests["getRepo"] += 1
            did = query.get("did", [""])[0]
            if not did:
                return _xrpc_error("InvalidRequest", "did is required")
            car = self._repos.get(did)
            if car is None:
                return _xrpc_error("RepoNotFound", f"Could not find repo for DID: {did}")
            return 200, "application/vnd.ipld.car", car
        if path == "/xrpc/com.atproto.sync.getLatestCommit":
            self.requests["getLatestCommit"] += 1
            did = query.get("did", [""])[0]
            if did not in self._repos:
                return _xrpc_error("RepoNotFound", f"Could not find repo for DID: {did}")
            cid, rev = self.head(did)
            return _json(200, {"cid": cid, "rev": rev})
        if path == "/xrpc/com.atproto.sync.listRepos":
            self.requests["listRepos"] += 1
            limit = min(1000, max(1, int(query.get("limit", ["500"])[0])))
            cursor = query.get("cursor", [""])[0]
            dids = sorted(d for d in self._repos if d > cursor)[:limit]
            repos = [
                {"did": d, "head": self.head(d)[0], "rev": self.head(d)[1], "active": True} for d in dids
            ]
            out: dict[str, Any] = {"repos": repos}
            if len(dids) == limit:
                out["cursor"] = dids[-1]
            return _json(200, out)
        if path.startswith(("/did:", "/did%3A", "/did%3a")):  # clients may percent-encode the colons
            self.requests["plc"] += 1
            ident = self._identities.get(unquote(path[1:]))
            if ident is None:
                return _json(404, {"message": "DID not registered"})
            return _json(200, did_document(ident, self._pds_url or self.url))
        self.requests["other"] += 1
        return _json(404, {"error": "NotFound", "message": path})


class _HttpServer(ThreadingHTTPServer):
    # socketserver's listen backlog is 5: a client opening dozens of connections at once (the
    # reference TypeScript resolver does, one per first-seen DID) has SYNs dropped and retried
    # by the kernel for up to ~30 s. A real PLC or PDS sits behind a backlog in the hundreds.
    request_queue_size = 1024
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client closing its keep-alive connections when it exits is not an error
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _json(status: int, obj: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(obj).encode()


def _xrpc_error(error: str, message: str) -> tuple[int, str, bytes]:
    return _json(400, {"error": error, "message": message})


class _Handler(BaseHTTPRequestHandler):
    app: RepoServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms per small keep-alive response on loopback).
    disable_nagle_algorithm = True

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        parts = urlsplit(self.path)
        status, ctype, body = self.app.route(parts.path, parse_qs(parts.query))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return


async def _serve_world(seed: int, n_dids: int, n_frames: int, close_when_done: bool) -> None:
    """Draw a World, serve its frames and its end-state repos until cancelled."""
    world = World(seed, n_dids=n_dids)
    frames = list(world.frames(n_frames))
    repos = {did: world.repo_car(did) for did in world.dids}
    with RepoServer(repos, world.identities) as http:
        async with FirehoseServer(frames, close_when_done=close_when_done) as ws:
            info = {
                "firehose": ws.url,
                "pds": http.url,
                "plc": http.url,
                "frames": len(frames),
                "last_seq": world.last_seq,
                "dids": world.dids,
            }
            print(json.dumps(info), flush=True)
            await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.servers [--seed N] [--dids N] [--frames N]`: a local relay + PDS + PLC in
    its own process (so a benchmarked consumer does not share a GIL with the server). Prints
    one JSON line with the URLs, then serves until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.servers", description=main.__doc__)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dids", type=int, default=100)
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--close-when-done", action="store_true")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve_world(args.seed, args.dids, args.frames, args.close_when_done))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
