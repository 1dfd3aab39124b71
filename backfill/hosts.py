"""Talking to untrusted hosts: the SSRF guard and the one guarded HTTP layer.

Every URL skyfill fetches during a backfill comes from untrusted input (a DID document names
the PDS; a relay or PDS answers with a redirect). The guard refuses targets that resolve to
loopback, private (RFC 1918, fc00::/7), link-local, multicast, unspecified, reserved and CGNAT
(100.64/10) addresses, including such IPv4 addresses embedded in IPv6 (mapped, 6to4, NAT64).

DNS rebinding: checking a name and then letting the HTTP library resolve it again would let a
hostile DNS server answer "public" to the check and "127.0.0.1" to the connect. So the check
is enforced where the socket is opened: `SafeHttp` gives httpcore a network backend
(`_GuardedBackend`) that resolves the name ONCE, checks every address it got, and connects to
those checked addresses only. The URL keeps the hostname, so TLS SNI and certificate checks
still use the name. `check_host` (a separate resolution) is only an early, friendlier refusal
(e.g. for a redirect target, before any slot or connection is taken).

Redirects are never followed by httpx: `SafeHttp.get` follows at most `max_redirects` itself,
checking each target. Proxies from the environment are ignored (`trust_env=False`): a proxy
would open the connection for us, past the guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from skyfill import metrics
from skyfill.errors import InputError, RetryableFetchError, UnsafeHostError

from .ratelimit import HostLimiter

__all__ = ["check_host", "is_unsafe_address", "host_key", "SafeHttp", "HttpResult", "REDIRECT_STATUSES"]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_ERROR_BODY_LIMIT = 64 * 1024  # bytes read from a non-2xx answer (enough for an XRPC error)
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_unsafe_address(ip: _IP) -> bool:
    """True for every address an untrusted URL must not reach."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_unsafe_address(embedded)
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_unspecified
        or ip.is_reserved
        or (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT)
        or not ip.is_global
    )


def host_key(url: str | httpx.URL) -> str:
    """The rate-limiting key of a URL: lower-case host, plus the port when not the default."""
    u = httpx.URL(str(url))
    return f"{u.host}:{u.port}" if u.port is not None else u.host


def _split(url: str) -> tuple[str, str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeHostError(f"malformed URL {url!r}") from exc
    if parts.scheme not in ("http", "https"):
        raise UnsafeHostError(f"scheme {parts.scheme!r} refused in {url!r}")
    host = parts.hostname
    if not host:
        raise UnsafeHostError(f"no host in {url!r}")
    if parts.username is not None or parts.password is not None:
        raise UnsafeHostError(f"credentials in URL refused: {url!r}", host=host)
    return parts.scheme, host, port if port is not None else (443 if parts.scheme == "https" else 80)


async def _resolve_checked(host: str, port: int, *, timeout: float | None) -> list[str]:
    """Resolve `host` once; refuse if ANY address is unsafe (a mixed answer is not trusted)."""
    try:
        literal: _IP | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        if is_unsafe_address(literal):
            raise UnsafeHostError(f"address {host} refused", host=host)
        return [host]
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=timeout
        )
    except (OSError, asyncio.TimeoutError, UnicodeError) as exc:
        raise RetryableFetchError(f"cannot resolve {host}: {exc!r}", host=host) from exc
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = str(sockaddr[0])
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
        if is_unsafe_address(ip):
            raise UnsafeHostError(f"{host} resolves to {addr}, refused", host=host)
        if addr not in addresses:
            addresses.append(addr)
    if not addresses:
        raise RetryableFetchError(f"{host} has no addresses", host=host)
    return addresses


async def check_host(
    url: str, *, allow_private: bool, trusted_hosts: Iterable[str] = (), timeout: float | None = 10.0
) -> None:
    """Refuse `url` unless it is http(s) and its host resolves only to public addresses.

    Raises UnsafeHostError; a name that does not resolve is a network failure
    (RetryableFetchError), not an unsafe host. `trusted_hosts` (operator configuration,
    e.g. the PLC directory) and `allow_private` (tests, private deployments) skip the
    address check but not the scheme check.
    """
    _scheme, host, port = _split(url)
    if allow_private or host in set(trusted_hosts):
        return
    await _resolve_checked(host, port, timeout=timeout)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks and connects in one step, so a name cannot re-resolve in between."""

    def __init__(self, *, allow_private: bool, trusted_hosts: frozenset[str]) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow_private = allow_private
        self._trusted = trusted_hosts

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self._allow_private or host in self._trusted:
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        try:
            addresses = await _resolve_checked(host, port, timeout=timeout)
        except RetryableFetchError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        last: Exception | None = None
        for addr in addresses:
            try:
                return await self._inner.connect_tcp(addr, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise UnsafeHostError("unix sockets are never used for remote hosts")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, *, limits: httpx.Limits, allow_private: bool, trusted_hosts: frozenset[str]) -> None:
        super().__init__(trust_env=False, limits=limits)
        # httpx 0.28 takes no network backend, so its pool is rebuilt with ours. The test
        # `test_client_refuses_loopback_name_at_connect` fails if this ever stops taking effect.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_GuardedBackend(allow_private=allow_private, trusted_hosts=trusted_hosts),
        )


@dataclass(frozen=True, slots=True)
class HttpResult:
    """One final (non-redirect) answer. `body` is capped: see `SafeHttp.get`."""

    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes


class SafeHttp:
    """A guarded httpx client: SSRF guard at connect time, manual redirects, capped bodies.

    Network failures and timeouts become RetryableFetchError; an over-limit body becomes
    InputError(kind="too_large"); an unsafe target becomes UnsafeHostError. Callers map
    these to their own context (PdsClient adds retries, Resolver maps to IdentityError).
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        total_timeout: float | None = 900.0,
        max_connections: int = 64,
        max_redirects: int = 3,
        allow_private_hosts: bool = False,
        trusted_hosts: Iterable[str] = (),
        user_agent: str = "skyfill",
    ) -> None:
        self.allow_private_hosts = allow_private_hosts
        self.trusted_hosts = frozenset(h.lower() for h in trusted_hosts)
        self._connect_timeout = connect_timeout
        self._total_timeout = total_timeout
        self._max_redirects = max_redirects
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client = httpx.AsyncClient(
            transport=_GuardedTransport(
                limits=limits, allow_private=allow_private_hosts, trusted_hosts=self.trusted_hosts
            ),
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=None),
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": user_agent},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> SafeHttp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def get(
        self,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        max_bytes: int,
        headers: Mapping[str, str] | None = None,
        limiter: HostLimiter | None = None,
        deadline: float | None = None,
    ) -> HttpResult:
        """GET `url`, following up to `max_redirects` redirects, each target checked first.

        With a `limiter`, each hop takes a slot of its own host and reports the answer's
        rate-limit headers back (so a 429 parks the host). A 2xx body over `max_bytes`
        aborts the download; other statuses keep at most 64 KiB of body.
        """
        target = str(httpx.URL(url, params=params)) if params else url
        for _hop in range(self._max_redirects + 1):
            try:
                await check_host(
                    target,
                    allow_private=self.allow_private_hosts,
                    trusted_hosts=self.trusted_hosts,
                    timeout=self._connect_timeout,
                )
                host = host_key(target)
                slot = limiter.slot(host, deadline=deadline) if limiter is not None else contextlib.nullcontext()
                async with slot:
                    result = await self._send(target, host, max_bytes=max_bytes, headers=headers)
            except UnsafeHostError:
                metrics.BACKFILL_REQUESTS.labels(result="unsafe").inc()
                raise
            except RetryableFetchError:
                metrics.BACKFILL_REQUESTS.labels(result="network").inc()
                raise
            except InputError:
                metrics.BACKFILL_REQUESTS.labels(result="too_large").inc()
                raise
            metrics.BACKFILL_REQUESTS.labels(result=_status_class(result.status)).inc()
            if limiter is not None:
                limiter.observe(host, result.status, result.headers)
            location = result.headers.get("location")
            if result.status in REDIRECT_STATUSES and location:
                target = urljoin(target, location)
                continue
            return result
        raise RetryableFetchError(f"more than {self._max_redirects} redirects from {url}", host=host_key(url))

    async def _send(
        self, url: str, host: str, *, max_bytes: int, headers: Mapping[str, str] | None
    ) -> HttpResult:
        try:
            async with asyncio.timeout(self._total_timeout):
                async with self._client.stream("GET", url, headers=headers) as resp:
                    status = resp.status_code
                    resp_headers = {k.lower(): v for k, v in resp.headers.items()}
                    if status in REDIRECT_STATUSES:
                        return HttpResult(url, status, resp_headers, b"")
                    ok = 200 <= status < 300
                    limit = max_bytes if ok else _ERROR_BODY_LIMIT
                    declared = resp.headers.get("content-length")
                    if ok and declared is not None and declared.isdigit() and int(declared) > limit:
                        raise InputError(
                            f"{url}: Content-Length {declared} exceeds {limit} bytes", kind="too_large"
                        )
                    body = await _read_capped(resp.aiter_bytes(), limit, fail=ok, url=url)
                    return HttpResult(url, status, resp_headers, body)
        except UnsafeHostError as exc:
            exc.host = exc.host or host
            raise
        except (httpx.TransportError, httpx.TimeoutException, TimeoutError) as exc:
            raise RetryableFetchError(f"{url}: {type(exc).__name__}: {exc}", host=host) from exc
        except httpx.HTTPError as exc:
            raise RetryableFetchError(f"{url}: {type(exc).__name__}: {exc}", host=host) from exc


def _status_class(status: int) -> str:
    return "429" if status == 429 else f"{status // 100}xx"


async def _read_capped(chunks: AsyncIterator[bytes], limit: int, *, fail: bool, url: str) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            if fail:
                raise InputError(f"{url}: body exceeds {limit} bytes", kind="too_large")
            parts.append(chunk[: limit - (size - len(chunk))])
            break
        parts.append(chunk)
    return b"".join(parts)
