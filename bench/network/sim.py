"""A simulated network in one process: H PDS hosts, a relay and a PLC directory on 127.0.0.1.

Each simulated PDS is its own stdlib ThreadingHTTPServer on its own port (the pipeline keys its
rate limits by host:port, as it would by DNS name) and publishes its limits the way the
reference PDS's `@atproto/xrpc-server` does (rate-limiter-flexible fixed windows, per client):

    bsky-like        10 getRepo per 1 s window (other routes unlimited)
    reference-like   3,000 requests per 300 s window, every route counted

Every answer to a limited route carries `RateLimit-Limit`, `RateLimit-Remaining`,
`RateLimit-Reset` (epoch seconds, floored: what the reference sends) and `RateLimit-Policy`
(`limit;w=seconds`); a request beyond the window's points gets 429 with `Retry-After`
(seconds, rounded up) and is COUNTED as an over-limit request. Every getRepo is counted per host
per wall-clock second. Each request sleeps `latency` before answering.

Repos are real signed repos: a ladder of record-count templates (real MST + records, built once
by the test generator) whose commit is signed per DID with that DID's own K-256 key, so every
CAR verifies against the DID document the PLC stand-in serves. Record counts per DID are drawn
from a heavy-tailed mix (lognormal body, Pareto tail: most repos tiny, a few with thousands).
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import libipld
from skyfill.protocol.car import cid_to_str, read_car

from tests.support.generate import (
    GeneratedIdentity,
    did_document,
    generate_repo,
    make_identity,
    multikey,
    sign_commit,
    tid,
)
from tests.support.generate.repo import car_block, car_header

__all__ = ["BSKY", "OPEN", "REFERENCE", "HostSpec", "NetworkSpec", "SimNetwork", "Template", "build_templates", "draw_sizes"]

BSKY: Final = "bsky"
REFERENCE: Final = "reference"
OPEN: Final = "open"           # no limit at all: the calibration of the client's own speed
# 10 getRepo/s counted over 5 s windows: the same rate, with a pacing margin (5% of the window:
# 263 ms) that a loaded test machine's scheduling jitter does not eat (1 s windows leave 53 ms)
BSKY_5S: Final = "bsky-5s"
GET_REPO: Final = "/xrpc/com.atproto.sync.getRepo"
LIST_REPOS: Final = "/xrpc/com.atproto.sync.listRepos"
LIST_HOSTS: Final = "/xrpc/com.atproto.sync.listHosts"
LIST_BY_COLLECTION: Final = "/xrpc/com.atproto.sync.listReposByCollection"
GET_LATEST: Final = "/xrpc/com.atproto.sync.getLatestCommit"
_REV_MICROS: Final = 1_764_000_000_000_000
_PLC_EPOCH: Final = 1_700_000_000.0


@dataclass(frozen=True, slots=True)
class HostSpec:
    kind: str                  # BSKY | REFERENCE
    points: int                # requests allowed per window
    window: float              # seconds
    routes: frozenset[str]     # the routes the limit counts

    @classmethod
    def of(cls, kind: str) -> HostSpec:
        if kind == BSKY:
            return cls(BSKY, 10, 1.0, frozenset({GET_REPO}))
        if kind == REFERENCE:
            return cls(REFERENCE, 3000, 300.0, frozenset({GET_REPO, LIST_REPOS, GET_LATEST}))
        if kind == BSKY_5S:
            return cls(BSKY_5S, 50, 5.0, frozenset({GET_REPO}))
        if kind == OPEN:
            return cls(OPEN, 10**9, 1.0, frozenset())
        raise ValueError(kind)

    @property
    def rate(self) -> float:
        """The published sustained rate, requests/s."""
        return self.points / self.window


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    hosts: tuple[str, ...]       # kind per host
    repos: int
    latency: float = 0.02        # seconds per request
    seed: int = 1
    max_records: int = 5000
    fixed_records: int | None = None   # every repo this size (calibration), else heavy-tailed

    @classmethod
    def mixed(cls, n_hosts: int, repos: int, **kw: Any) -> NetworkSpec:
        """One reference-like host in four, the rest bsky-like."""
        kinds = tuple(REFERENCE if i % 4 == 3 else BSKY for i in range(n_hosts))
        return cls(kinds, repos, **kw)


@dataclass(frozen=True, slots=True)
class Template:
    records: int
    data: bytes                       # the MST root CID (binary)
    body: bytes                       # every block but the commit, CAR-framed
    collections: frozenset[str]


def _ladder(max_records: int) -> list[int]:
    sizes = {1, 2, 3, 4, 5, 6, 8}
    n = 8.0
    while n < max_records:
        n *= 1.35
        sizes.add(min(max_records, int(n)))
    return sorted(sizes)


def draw_sizes(rng: random.Random, n: int, max_records: int) -> list[int]:
    """Heavy-tailed record counts: 98% lognormal (median 8), 2% Pareto (x_m 150, alpha 1.1),
    clipped to [1, max_records], rounded to the template ladder."""
    ladder = _ladder(max_records)
    out = []
    for _ in range(n):
        x = 150 * rng.paretovariate(1.1) if rng.random() < 0.02 else rng.lognormvariate(math.log(8), 1.1)
        x = max(1, min(max_records, int(x)))
        out.append(ladder[min(len(ladder) - 1, bisect_left(ladder, x))])
    return out


def build_templates(sizes: Sequence[int], seed: int) -> dict[int, Template]:
    """One template per distinct size: a real repo, its commit dropped (signed again per DID)."""
    rng = random.Random(seed)
    out: dict[int, Template] = {}
    for n in sorted(set(sizes)):
        ident = make_identity(rng)
        car = generate_repo(rng, did=ident.did, key=ident.secret, n_records=n)
        roots, blocks = read_car(car)
        commit = blocks.pop(roots[0])
        data = _commit_data(commit)
        body = b"".join(car_block(c, b) for c, b in blocks.items())
        collections = frozenset(_collections(blocks, data))
        out[n] = Template(n, data, body, collections)
    return out


def _commit_data(commit: bytes) -> bytes:
    return bytes(libipld.decode_dag_cbor(commit)["data"])


def _collections(blocks: dict[bytes, bytes], root: bytes) -> set[str]:
    out: set[str] = set()
    stack = [root]
    while stack:
        node = libipld.decode_dag_cbor(blocks[stack.pop()])
        if node.get("l") is not None:
            stack.append(bytes(node["l"]))
        prev = b""
        for e in node["e"]:
            key = prev[: e["p"]] + bytes(e["k"])
            prev = key
            out.add(key.split(b"/", 1)[0].decode())
            if e.get("t") is not None:
                stack.append(bytes(e["t"]))
    return out


@dataclass(slots=True)
class _Repo:
    did: str
    host: int
    records: int
    head: str
    rev: str
    car_prefix: bytes      # CAR header + the signed commit block
    template: Template
    ident: GeneratedIdentity


@dataclass(slots=True)
class _Window:
    start: float = 0.0
    used: int = 0


@dataclass(slots=True)
class HostStats:
    over_limit: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    per_second: Counter[int] = field(default_factory=Counter)   # getRepo per wall-clock second


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # clients closing keep-alive connections


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    route: Any  # (path, query, client) -> (status, headers, body)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        status, headers, body = self.route(parts.path, parse_qs(parts.query), self.client_address[0])
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


def _json(status: int, obj: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


class SimNetwork:
    """The simulated hosts, relay and PLC. `with SimNetwork(spec).running() as net: net.relay_url`."""

    def __init__(self, spec: NetworkSpec, templates: dict[int, Template] | None = None) -> None:
        self.spec = spec
        self.host_specs = [HostSpec.of(k) for k in spec.hosts]
        rng = random.Random(spec.seed)
        sizes = ([spec.fixed_records] * spec.repos if spec.fixed_records
                 else draw_sizes(rng, spec.repos, spec.max_records))
        self.templates = templates if templates is not None else build_templates(sizes, spec.seed + 1)
        self.repos: dict[str, _Repo] = {}
        self._by_host: list[list[str]] = [[] for _ in spec.hosts]
        self._ports: list[int] = []
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self.stats = [HostStats() for _ in spec.hosts]
        self.plc_requests: Counter[str] = Counter()
        self.relay_requests: Counter[str] = Counter()
        self._windows: dict[tuple[int, str], _Window] = defaultdict(_Window)
        self._lock = threading.Lock()
        self._sizes = sizes
        self._rng = rng
        self.first_get, self.last_get = math.inf, 0.0

    # -- building ----------------------------------------------------------------------------

    def _build_repos(self) -> None:
        rev = tid(_REV_MICROS, 0)
        for i, n in enumerate(self._sizes):
            ident = make_identity(self._rng)
            host = i % len(self.host_specs)
            tpl = self.templates[n]
            cid, block = sign_commit(ident.key, did=ident.did, data=tpl.data, rev=rev)
            prefix = car_header(cid) + car_block(cid, block)
            self.repos[ident.did] = _Repo(ident.did, host, n, cid_to_str(cid), rev, prefix, tpl, ident)
            self._by_host[host].append(ident.did)
        for dids in self._by_host:
            dids.sort()
        self._sorted = sorted(self.repos)
        self._plc_log = [  # (createdAt, did): one operation per DID, oldest first
            (_iso(_PLC_EPOCH + i * 0.001), did) for i, did in enumerate(self._sorted)
        ]

    def host_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self._ports[i]}"

    @property
    def relay_url(self) -> str:
        return f"http://127.0.0.1:{self._ports[len(self.host_specs)]}"

    @property
    def plc_url(self) -> str:
        return f"http://127.0.0.1:{self._ports[len(self.host_specs) + 1]}"

    @property
    def total_records(self) -> int:
        return sum(r.records for r in self.repos.values())

    def repos_on(self, i: int) -> int:
        return len(self._by_host[i])

    @contextmanager
    def running(self) -> Iterator[SimNetwork]:
        if not self.repos:
            self._build_repos()
        routes = [self._host_route(i) for i in range(len(self.host_specs))] + [self._relay_route, self._plc_route]
        with ExitStack() as stack:
            for route in routes:
                handler = type("_H", (_Handler,), {"route": staticmethod(route)})
                srv = _Server(("127.0.0.1", 0), handler)
                stack.callback(srv.server_close)
                self._servers.append(srv)
                self._ports.append(srv.server_address[1])
                t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
                t.start()
                stack.callback(srv.shutdown)
                self._threads.append(t)
            yield self

    # -- limits ------------------------------------------------------------------------------

    def _consume(self, i: int, client: str) -> tuple[bool, dict[str, str]]:
        """rate-limiter-flexible's fixed window: starts at the first request, `points` per window."""
        spec = self.host_specs[i]
        now = time.time()
        with self._lock:
            w = self._windows[(i, client)]
            if now >= w.start + spec.window:
                w.start, w.used = now, 0
            w.used += 1
            used, end = w.used, w.start + spec.window
            over = used > spec.points
            if over:
                self.stats[i].over_limit += 1
        headers = {
            "RateLimit-Limit": str(spec.points),
            "RateLimit-Remaining": str(max(0, spec.points - used)),
            "RateLimit-Reset": str(math.floor(end)),
            "RateLimit-Policy": f"{spec.points};w={spec.window:g}",
        }
        if over:
            headers["Retry-After"] = str(math.ceil(end - now))
        return not over, headers

    def reset_counters(self) -> None:
        with self._lock:
            self.stats = [HostStats() for _ in self.host_specs]
            self.first_get, self.last_get = math.inf, 0.0

    def max_per_second(self) -> int:
        """The most getRepo one host answered in one wall-clock second."""
        return max((max(s.per_second.values(), default=0) for s in self.stats), default=0)

    @property
    def over_limit(self) -> int:
        return sum(s.over_limit for s in self.stats)

    def get_repo_count(self) -> int:
        return sum(s.requests["getRepo"] for s in self.stats)

    # -- routes ------------------------------------------------------------------------------

    def _host_route(self, i: int) -> Any:
        spec = self.host_specs[i]
        latency = self.spec.latency

        def route(path: str, query: dict[str, list[str]], client: str) -> tuple[int, dict[str, str], bytes]:
            time.sleep(latency)
            headers: dict[str, str] = {}
            if path in spec.routes:
                ok, headers = self._consume(i, client)
                if not ok:
                    status, h, body = _json(429, {"error": "RateLimitExceeded", "message": "Rate Limit Exceeded"})
                    return status, {**h, **headers}, body
            st = self.stats[i]
            if path == GET_REPO:
                did = query.get("did", [""])[0]
                now = time.time()
                with self._lock:
                    st.requests["getRepo"] += 1
                    st.per_second[int(now)] += 1
                    self.first_get = min(self.first_get, now)
                    self.last_get = max(self.last_get, now)
                repo = self.repos.get(did)
                if repo is None or repo.host != i:
                    s, h, b = _json(400, {"error": "RepoNotFound", "message": f"Could not find repo for DID: {did}"})
                    return s, {**h, **headers}, b
                body = repo.car_prefix + repo.template.body
                return 200, {"Content-Type": "application/vnd.ipld.car", **headers}, body
            if path == LIST_REPOS:
                with self._lock:
                    st.requests["listRepos"] += 1
                s, h, b = self._list_repos(self._by_host[i], query)
                return s, {**h, **headers}, b
            if path == GET_LATEST:
                repo = self.repos.get(query.get("did", [""])[0])
                if repo is None:
                    return _json(400, {"error": "RepoNotFound", "message": "no such repo"})
                s, h, b = _json(200, {"cid": repo.head, "rev": repo.rev})
                return s, {**h, **headers}, b
            if path == LIST_HOSTS:
                return _json(501, {"error": "MethodNotImplemented", "message": "not a relay"})
            return _json(404, {"error": "NotFound", "message": path})

        return route

    def _list_repos(self, dids: Sequence[str], query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        limit = min(1000, max(1, int(query.get("limit", ["500"])[0])))
        cursor = query.get("cursor", [""])[0]
        start = bisect_left(dids, cursor) if cursor else 0
        if cursor and start < len(dids) and dids[start] == cursor:
            start += 1
        page = dids[start : start + limit]
        repos = [{"did": d, "head": self.repos[d].head, "rev": self.repos[d].rev, "active": True} for d in page]
        out: dict[str, Any] = {"repos": repos}
        if len(page) == limit:
            out["cursor"] = page[-1]
        return _json(200, out)

    def _relay_route(self, path: str, query: dict[str, list[str]], client: str) -> tuple[int, dict[str, str], bytes]:
        time.sleep(self.spec.latency)
        with self._lock:
            self.relay_requests[path.rsplit(".", 1)[-1]] += 1
        if path == LIST_HOSTS:
            hosts = [
                {"hostname": f"127.0.0.1:{self._ports[i]}", "seq": 1, "accountCount": len(self._by_host[i]),
                 "status": "active"}
                for i in range(len(self.host_specs))
            ]
            cursor = query.get("cursor", [""])[0]
            return _json(200, {"hosts": [] if cursor else hosts, **({} if cursor else {"cursor": "end"})})
        if path == LIST_REPOS:
            return self._list_repos(self._sorted, query)
        if path == LIST_BY_COLLECTION:
            collection = query.get("collection", [""])[0]
            limit = min(2000, max(1, int(query.get("limit", ["500"])[0])))
            cursor = query.get("cursor", [""])[0]
            start = bisect_left(self._sorted, cursor) if cursor else 0
            if cursor and start < len(self._sorted) and self._sorted[start] == cursor:
                start += 1
            found: list[str] = []
            for did in self._sorted[start:]:
                if collection in self.repos[did].template.collections:
                    found.append(did)
                    if len(found) == limit:
                        break
            out: dict[str, Any] = {"repos": [{"did": d} for d in found]}
            if len(found) == limit:
                out["cursor"] = found[-1]
            return _json(200, out)
        return _json(404, {"error": "NotFound", "message": path})

    def _plc_route(self, path: str, query: dict[str, list[str]], client: str) -> tuple[int, dict[str, str], bytes]:
        time.sleep(self.spec.latency)
        if path == "/export":
            with self._lock:
                self.plc_requests["export"] += 1
            count = min(1000, max(1, int(query.get("count", ["10"])[0])))
            after = query.get("after", [""])[0]
            start = bisect_left(self._plc_log, (after, "~")) if after else 0
            lines = [self._export_line(at, did) for at, did in self._plc_log[start : start + count]]
            return 200, {"Content-Type": "application/jsonlines"}, "".join(lines).encode()
        if path.startswith(("/did:", "/did%3A", "/did%3a")):
            with self._lock:
                self.plc_requests["resolve"] += 1
            repo = self.repos.get(unquote(path[1:]))
            if repo is None:
                return _json(404, {"message": "DID not registered"})
            return _json(200, did_document(repo.ident, self.host_url(repo.host)))
        return _json(404, {"message": path})

    def _export_line(self, created_at: str, did: str) -> str:
        repo = self.repos[did]
        op = {
            "type": "plc_operation",
            "rotationKeys": [f"did:key:{multikey(repo.ident.public_key)}"],
            "verificationMethods": {"atproto": f"did:key:{multikey(repo.ident.public_key)}"},
            "alsoKnownAs": [f"at://{repo.ident.handle}"],
            "services": {"atproto_pds": {"type": "AtprotoPersonalDataServer", "endpoint": self.host_url(repo.host)}},
            "prev": None,
            "sig": "sim",
        }
        return json.dumps({"did": did, "operation": op, "cid": repo.head, "nullified": False,
                           "createdAt": created_at}) + "\n"


def _iso(epoch: float) -> str:
    t = time.gmtime(epoch)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{round(epoch * 1000) % 1000:03d}Z"
