"""A real HTTP server on 127.0.0.1 whose answers each test scripts, faults included.

    with FaultServer() as srv:
        srv.script("/xrpc/com.atproto.sync.getRepo", Reply(500), Reply(200, car_bytes))
        ... client GETs srv.url + path ...
        assert srv.count("/xrpc/com.atproto.sync.getRepo") == 2

A path's replies are served in order; the last one repeats. A reply can also be a function
of the request (for pagination). Every request is recorded (method, path, query, headers,
time), every answer's status and the time it was written (`answered`), and every TCP
connection accepted (`connections`, which counts even connections that never send a
request), so a test can assert what the client did, including that it never connected.
A reply can trickle its body (`trickle`: seconds between `trickle_bytes`-byte writes) to play
a PDS that keeps a transfer alive without ever finishing it. `FaultServer(host="127.0.0.2")`
binds another loopback address (the SSRF tests need two hosts). Stdlib only; one thread per
connection.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "FaultServer",
    "Reply",
    "Answered",
    "Seen",
    "json_reply",
    "xrpc_error",
    "redirect",
    "rate_limited",
    "http_date",
]


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0                  # seconds of silence before the status line
    chunked: bool = False               # no Content-Length: stream in 64 KiB chunks
    content_length: int | None = None   # lie about the length (then close early)
    trickle: float = 0.0                # > 0: seconds between body writes of `trickle_bytes`
    trickle_bytes: int = 1


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at: float


Handler = Callable[[Seen], Reply]
_PROBE = "/__faultserver_probe__"


def json_reply(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


def xrpc_error(error: str, message: str = "", status: int = 400) -> Reply:
    return json_reply({"error": error, "message": message}, status)


def redirect(location: str, status: int = 302) -> Reply:
    return Reply(status, b"", {"Location": location})


def http_date(epoch: float) -> str:
    return formatdate(epoch, usegmt=True)


def rate_limited(retry_after: str = "1", *, reset: float | None = None, limit: int = 3000) -> Reply:
    """A 429 with Retry-After and the RateLimit-* headers the reference PDS sends."""
    headers = {"Retry-After": retry_after, "RateLimit-Limit": str(limit), "RateLimit-Remaining": "0"}
    if reset is not None:
        headers["RateLimit-Reset"] = str(int(reset))
    return json_reply({"error": "RateLimitExceeded", "message": "slow down"}, 429, headers)


@dataclass(frozen=True)
class Answered:
    request: Seen
    status: int
    at: float  # when the status line and headers had been written


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    on_connect: Callable[[], None] = staticmethod(lambda: None)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.on_connect()
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up (timeouts, aborted oversized downloads) are part of the script.
        pass


class FaultServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self._scripts: dict[str, list[Reply | Handler]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._host = host
        self.requests: list[Seen] = []
        self.answered: list[Answered] = []
        self._connections = 0
        self._probes = 0
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                parts = urlsplit(self.path)
                if parts.path == _PROBE:  # connections_made(): not a client request
                    self.send_response(204)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                seen = Seen(
                    method="GET",
                    path=parts.path,
                    query={k: v[-1] for k, v in parse_qs(parts.query).items()},
                    headers={k.lower(): v for k, v in self.headers.items()},
                    at=time.time(),
                )
                reply = server._next(seen)
                if reply.delay and server._stop.wait(reply.delay):
                    return
                try:
                    self._write(reply, seen)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _write(self, reply: Reply, seen: Seen) -> None:
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                if reply.trickle > 0:
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.flush()
                    server._answered(seen, reply.status)
                    for i in range(0, len(reply.body), reply.trickle_bytes):
                        self.wfile.write(reply.body[i : i + reply.trickle_bytes])
                        self.wfile.flush()
                        if server._stop.wait(reply.trickle):
                            return
                    return
                if reply.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(reply.body), 65536):
                        chunk = reply.body[i : i + 65536]
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    server._answered(seen, reply.status)
                    self.wfile.write(b"0\r\n\r\n")
                    return
                length = reply.content_length if reply.content_length is not None else len(reply.body)
                self.send_header("Content-Length", str(length))
                if reply.content_length is not None:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                # recorded before the body goes out: once the client has the answer, so has `answered`
                server._answered(seen, reply.status)
                self.wfile.write(reply.body)
                self.wfile.flush()

        self._httpd = _QuietServer((host, 0), _Handler)
        self._httpd.on_connect = self._connected
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="faultserver", daemon=True
        )

    # -- scripting ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (a refused-before-connect client leaves it at 0)."""
        with self._lock:
            return self._connections

    def connections_made(self) -> int:
        """Connections clients made before this call, counted exactly (no sleep): a probe
        request is sent and answered first. The server accepts connections one at a time in
        arrival order, so once the probe is answered every earlier one has been counted."""
        conn = http.client.HTTPConnection(self._host, self.port, timeout=10)
        try:
            conn.request("GET", _PROBE)
            conn.getresponse().read()
        finally:
            conn.close()
        with self._lock:
            self._probes += 1
            return self._connections - self._probes

    def _connected(self) -> None:
        with self._lock:
            self._connections += 1

    def _answered(self, seen: Seen, status: int) -> None:
        with self._lock:
            self.answered.append(Answered(seen, status, time.time()))

    def script(self, path: str, *replies: Reply | Handler) -> None:
        """Serve `replies` in order for GETs of `path` (query ignored); the last one repeats."""
        with self._lock:
            self._scripts[path] = list(replies)

    def _next(self, seen: Seen) -> Reply:
        with self._lock:
            self.requests.append(seen)
            queue = self._scripts.get(seen.path)
            if not queue:
                return xrpc_error("NotFound", f"nothing scripted for {seen.path}", 404)
            item = queue.pop(0) if len(queue) > 1 else queue[0]
        return item(seen) if callable(item) else item

    def seen(self, path: str) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def count(self, path: str) -> int:
        return len(self.seen(path))

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # releases handlers sleeping in a `delay`
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
