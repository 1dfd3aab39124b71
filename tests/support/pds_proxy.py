"""A pass-through proxy in front of one real PDS, on 127.0.0.1, that can play a fault.

    proxy = PdsProxy()                                   # listens now: its port is known
    net = LocalNetwork(pds_count=2, public_ports=(proxy.port,)).start()
    proxy.upstream = net.pdses[0].url                    # the PDS publishes http://localhost:<proxy.port>
    proxy.fault = lambda seen: rate_limited("4") if ... else None   # None: pass through
    proxy.requests(GET_REPO)                             # every getRepo the PDS was asked, in order

The PDS writes the proxy's port into its DID documents (`LocalNetwork(public_ports=...)`), so
skyfill reaches the PDS only through the proxy, exactly as it would reach a PDS on the network;
every request is recorded (tests/support/faultserver.py) and may be answered by `fault` instead.
The proxy itself is a fault stand-in: a real PDS answers 429 only at its own limits. GET only
(what skyfill sends to a PDS); tests write to the PDS directly at `pdses[i].url`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import httpx

from tests.support.faultserver import FaultServer, Reply, Seen

__all__ = ["GET_REPO", "LIST_REPOS", "PdsProxy"]

GET_REPO: Final = "/xrpc/com.atproto.sync.getRepo"
LIST_REPOS: Final = "/xrpc/com.atproto.sync.listRepos"
_PATHS: Final = (
    GET_REPO,
    LIST_REPOS,
    "/xrpc/com.atproto.sync.getLatestCommit",
    "/xrpc/com.atproto.sync.getRepoStatus",
    "/xrpc/com.atproto.sync.getRecord",
    "/xrpc/com.atproto.repo.describeRepo",
    "/xrpc/com.atproto.repo.listRecords",
    "/xrpc/com.atproto.repo.getRecord",
    "/xrpc/com.atproto.server.describeServer",
    "/xrpc/com.atproto.identity.resolveHandle",
    "/.well-known/atproto-did",
)
_PASSED_HEADERS: Final = ("content-type", "retry-after", "ratelimit-limit", "ratelimit-remaining",
                          "ratelimit-reset", "ratelimit-policy")

Fault = Callable[[Seen], Reply | None]


class PdsProxy:
    def __init__(self) -> None:
        self.upstream: str | None = None
        self.fault: Fault | None = None
        self._server = FaultServer()
        self._http = httpx.Client(timeout=60)
        for path in _PATHS:
            self._server.script(path, self._answer)

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def server(self) -> FaultServer:
        """The FaultServer underneath: `answered` has every status and when it went out."""
        return self._server

    def requests(self, path: str = GET_REPO) -> list[Seen]:
        return self._server.seen(path)

    def clear(self) -> None:
        """Forget what was recorded (between the steps of a test)."""
        self._server.requests.clear()
        self._server.answered.clear()

    def _answer(self, seen: Seen) -> Reply:
        fault = self.fault
        if fault is not None:
            reply = fault(seen)
            if reply is not None:
                return reply
        if self.upstream is None:
            return Reply(502, b"no upstream yet")
        got = self._http.get(f"{self.upstream}{seen.path}", params=seen.query)
        headers = {k: v for k, v in got.headers.items() if k.lower() in _PASSED_HEADERS}
        return Reply(got.status_code, got.content, headers)

    def start(self) -> PdsProxy:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()
        self._http.close()

    def __enter__(self) -> PdsProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
